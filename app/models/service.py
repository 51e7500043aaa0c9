from __future__ import annotations

from typing import BinaryIO

from sqlalchemy.orm import Session

from app.errors import Invalid, NotFound, from_engine
from app.models.models import ModelFile
from app.storage import Storage
from app.uploads import clean_filename, is_uuid, new_id
from worker.engine.errors import EngineError
from worker.engine.inspect import check_model, parse_model_bytes

REFUSED_SUFFIXES = {
    ".pt": "a pickled PyTorch checkpoint",
    ".pth": "a pickled PyTorch checkpoint",
    ".pkl": "a Python pickle",
    ".bin": "a raw weights file",
    ".safetensors": "a weights-only file",
}


def create_model(db: Session, storage: Storage, src: BinaryIO, filename: str | None, max_bytes: int) -> ModelFile:
    """Store an uploaded model after checking that it is a loadable, self-contained ONNX model."""
    name = clean_filename(filename, "model.onnx")
    suffix = "." + name.rsplit(".", 1)[-1].lower() if "." in name else ""
    if suffix in REFUSED_SUFFIXES:
        raise Invalid(
            f"'{name}' looks like {REFUSED_SUFFIXES[suffix]}, which lowbit does not load (it could run "
            "arbitrary code). Export the model to ONNX, e.g. torch.onnx.export(model, example_inputs, 'model.onnx')",
            code="unsupported_model_format",
        )
    if suffix == ".pt2":
        raise Invalid(
            "torch.export archives (.pt2) are not accepted by this server yet; export the model to ONNX "
            "with torch.onnx.export(model, example_inputs, 'model.onnx') and upload that",
            code="unsupported_model_format",
        )
    stored = storage.receive(src, max_bytes)
    try:
        try:
            info = check_model(parse_model_bytes(stored.path.read_bytes()))
        except EngineError as exc:
            raise from_engine(exc) from exc
        model_id = new_id()
        dest = storage.place(stored.path, storage.model_path(model_id))
    except BaseException:
        storage.discard(stored.path)
        raise
    row = ModelFile(
        id=model_id,
        filename=name,
        format=info.format,
        size_bytes=stored.size_bytes,
        sha256=stored.sha256,
        opset=info.opset,
        inputs=[i.to_dict() for i in info.inputs],
        outputs=[o.to_dict() for o in info.outputs],
        storage_path=str(dest),
    )
    db.add(row)
    db.flush()
    return row


def get_model(db: Session, model_id: str) -> ModelFile:
    row = db.get(ModelFile, model_id) if is_uuid(model_id) else None
    if row is None:
        raise NotFound(f"no model with id '{model_id}'", code="model_not_found")
    return row
