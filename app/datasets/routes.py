from __future__ import annotations

from fastapi import APIRouter, File, Query, Request, UploadFile

from app.auth import ApiPrincipal
from app.datasets import service
from app.datasets.schemas import DatasetList, DatasetOut
from app.deps import SessionDep, StorageDep
from app.errors import error_responses
from app.tenants import service as tenants

router = APIRouter(prefix="/api/v1/datasets", tags=["datasets"], responses=error_responses(401, 422))


@router.post("", status_code=201, response_model=DatasetOut, responses=error_responses(400, 413, 422, 429, 507),
             openapi_extra={"requestBody": {"content": {"multipart/form-data": {
                 "example": {"file": "(the bytes of calib.npz)"}}}}})
def upload_dataset(
    request: Request,
    db: SessionDep,
    storage: StorageDep,
    who: ApiPrincipal,
    file: UploadFile = File(..., description="An .npz with one array per model input (+ optional 'labels')"),
) -> DatasetOut:
    """Upload a calibration or evaluation dataset (.npz, no pickles)."""
    tenants.check_upload_rate(db, who.tenant_id, settings=request.app.state.settings)
    row = service.create_dataset(db, storage, src=file.file, filename=file.filename,
                                 max_bytes=request.app.state.settings.max_upload_bytes, tenant_id=who.tenant_id,
                                 settings=request.app.state.settings)
    db.commit()
    return DatasetOut.model_validate(row)


@router.get("", response_model=DatasetList, responses=error_responses(422))
def find_datasets(
    db: SessionDep,
    who: ApiPrincipal,
    sha256: str = Query(pattern="^[0-9a-fA-F]{64}$", description="The file's SHA-256, hex",
                        examples=["5d41402abc4b2a76b9719d911017c592ae5fd9c1d2ae6f53a7b0e6c1d3b9f6a2"]),
) -> DatasetList:
    """The stored dataset with this SHA-256, if there is one (`items` is then one dataset, else empty): a client
    hashes its file first and uploads it only when the server does not have it yet."""
    row = service.find_by_sha256(db, sha256, tenant_id=who.tenant_id)
    return DatasetList(items=[DatasetOut.model_validate(row)] if row else [])


@router.get("/{dataset_id}", response_model=DatasetOut, responses=error_responses(404))
def get_dataset(dataset_id: str, db: SessionDep, who: ApiPrincipal) -> DatasetOut:
    """Describe an uploaded dataset: arrays, dtypes, shapes and sample count."""
    return DatasetOut.model_validate(service.get_dataset(db, dataset_id, tenant_id=who.tenant_id))
