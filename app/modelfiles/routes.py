from __future__ import annotations

from fastapi import APIRouter, File, Query, Request, UploadFile

from app.auth import ApiPrincipal
from app.deps import SessionDep, StorageDep
from app.errors import error_responses
from app.modelfiles import service
from app.modelfiles.schemas import ModelList, ModelOut
from app.tenants import service as tenants

router = APIRouter(prefix="/api/v1/models", tags=["models"], responses=error_responses(401, 422))


@router.post("", status_code=201, response_model=ModelOut, responses=error_responses(400, 413, 422, 429, 507),
             openapi_extra={"requestBody": {"content": {"multipart/form-data": {
                 "example": {"file": "(the bytes of model.onnx)"}}}}})
def upload_model(
    request: Request,
    db: SessionDep,
    storage: StorageDep,
    who: ApiPrincipal,
    file: UploadFile = File(..., description="An ONNX model (.onnx), a .zip or .tar bundle of one with its "
                            "external data files, or a torch.export archive (.pt2)"),
) -> ModelOut:
    """Upload an ONNX model, a .zip/.tar bundle of one with its external data, or a torch.export archive
    (.pt2); it is parsed and checked now, and refused if it is not loadable or a bundle could reach outside its
    folder. Pickled PyTorch files (.pt, .pth) and TorchScript are refused. Files over the upload limit go
    through /api/v1/uploads (resumable)."""
    tenants.check_upload_rate(db, who.tenant_id, settings=request.app.state.settings)
    row = service.create_model(db, storage, src=file.file, filename=file.filename,
                               max_bytes=request.app.state.settings.max_upload_bytes, tenant_id=who.tenant_id,
                               settings=request.app.state.settings)
    db.commit()
    return ModelOut.model_validate(row)


@router.get("", response_model=ModelList, responses=error_responses(422))
def find_models(
    db: SessionDep,
    who: ApiPrincipal,
    sha256: str = Query(pattern="^[0-9a-fA-F]{64}$", description="The file's SHA-256, hex",
                        examples=["e27d6365b184087e4d225e07f7c6cbd9609548dea34e6e7ef8329ef25176acad"]),
) -> ModelList:
    """The stored model with this SHA-256, if there is one (`items` is then one model, else empty): a client
    hashes its file first and uploads it only when the server does not have it yet."""
    row = service.find_by_sha256(db, sha256, tenant_id=who.tenant_id)
    return ModelList(items=[ModelOut.model_validate(row)] if row else [])


@router.get("/{model_id}", response_model=ModelOut, responses=error_responses(404))
def get_model(model_id: str, db: SessionDep, who: ApiPrincipal) -> ModelOut:
    """Describe an uploaded model: inputs, outputs, size and hash."""
    return ModelOut.model_validate(service.get_model(db, model_id, tenant_id=who.tenant_id))
