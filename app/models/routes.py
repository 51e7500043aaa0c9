from __future__ import annotations

from fastapi import APIRouter, Depends, File, Request, UploadFile
from sqlalchemy.orm import Session

from app.deps import get_db, get_storage
from app.models import service
from app.models.schemas import ModelOut
from app.storage import Storage

router = APIRouter(prefix="/api/v1/models", tags=["models"])


@router.post("", status_code=201, response_model=ModelOut)
def upload_model(
    request: Request,
    file: UploadFile = File(..., description="A self-contained ONNX model (.onnx)"),
    db: Session = Depends(get_db),
    storage: Storage = Depends(get_storage),
) -> ModelOut:
    """Upload an ONNX model; it is parsed and checked now, and refused if it is not loadable."""
    row = service.create_model(db, storage, file.file, file.filename, request.app.state.settings.max_upload_bytes)
    db.commit()
    return ModelOut.model_validate(row)


@router.get("/{model_id}", response_model=ModelOut)
def get_model(model_id: str, db: Session = Depends(get_db)) -> ModelOut:
    """Describe an uploaded model: inputs, outputs, size and hash."""
    return ModelOut.model_validate(service.get_model(db, model_id))
