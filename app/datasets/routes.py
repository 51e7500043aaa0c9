from __future__ import annotations

from fastapi import APIRouter, Depends, File, Request, UploadFile
from sqlalchemy.orm import Session

from app.datasets import service
from app.datasets.schemas import DatasetOut
from app.deps import get_db, get_storage
from app.storage import Storage

router = APIRouter(prefix="/api/v1/datasets", tags=["datasets"])


@router.post("", status_code=201, response_model=DatasetOut)
def upload_dataset(
    request: Request,
    file: UploadFile = File(..., description="An .npz with one array per model input (+ optional 'labels')"),
    db: Session = Depends(get_db),
    storage: Storage = Depends(get_storage),
) -> DatasetOut:
    """Upload a calibration or evaluation dataset (.npz, no pickles)."""
    row = service.create_dataset(db, storage, file.file, file.filename, request.app.state.settings.max_upload_bytes)
    db.commit()
    return DatasetOut.model_validate(row)


@router.get("/{dataset_id}", response_model=DatasetOut)
def get_dataset(dataset_id: str, db: Session = Depends(get_db)) -> DatasetOut:
    """Describe an uploaded dataset: arrays, dtypes, shapes and sample count."""
    return DatasetOut.model_validate(service.get_dataset(db, dataset_id))
