from __future__ import annotations

from fastapi import APIRouter, Header, Path, Query, Request, Response
from sqlalchemy.exc import IntegrityError
from starlette.concurrency import run_in_threadpool

from app.auth import ApiPrincipal
from app.deps import SessionDep, StorageDep
from app.errors import LowbitError, NotFound, error_responses
from app.modelfiles.schemas import ModelOut
from app.resumable import service
from app.resumable.models import Upload
from app.resumable.schemas import UploadCreate, UploadList, UploadOut
from app.tenants import service as tenants

router = APIRouter(prefix="/api/v1/uploads", tags=["uploads"], responses=error_responses(401, 422))


@router.post("", status_code=201, response_model=UploadOut, responses=error_responses(413, 429, 507))
def create_upload(req: UploadCreate, request: Request, db: SessionDep, storage: StorageDep,
                  who: ApiPrincipal) -> UploadOut:
    """Start a resumable upload of a large model file (an .onnx, .pt2, or a .zip/.tar bundle of an ONNX model
    and its external data): announce its size and SHA-256, then PUT its parts in any order and finish it."""
    settings = request.app.state.settings
    tenants.check_upload_rate(db, who.tenant_id, settings=settings)
    row = service.create_upload(db, storage, req=req, tenant_id=who.tenant_id, settings=settings)
    db.commit()
    return service.describe(db, row)


@router.get("", response_model=UploadList, responses=error_responses(422))
def find_uploads(
    db: SessionDep,
    who: ApiPrincipal,
    sha256: str = Query(pattern="^[0-9a-fA-F]{64}$", description="The file's SHA-256, hex",
                        examples=["e27d6365b184087e4d225e07f7c6cbd9609548dea34e6e7ef8329ef25176acad"]),
) -> UploadList:
    """Unfinished uploads of the file with this SHA-256 (newest first): a client continues one instead of
    sending the file again."""
    return UploadList(items=[service.describe(db, row) for row in service.find_unfinished(db, sha256,
                                                                                          tenant_id=who.tenant_id)])


@router.get("/{upload_id}", response_model=UploadOut, responses=error_responses(404))
def get_upload(upload_id: str, db: SessionDep, who: ApiPrincipal) -> UploadOut:
    """Which parts arrived and which are missing: after an interruption, send the missing ones."""
    return service.describe(db, service.get_upload(db, upload_id, tenant_id=who.tenant_id))


@router.put("/{upload_id}/parts/{index}", status_code=204, responses=error_responses(404, 409, 413),
            openapi_extra={"requestBody": {"required": True, "content": {"application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "example": "(bytes part_bytes * index onwards of the file, part_bytes of them)"}}}})
async def put_part(
    request: Request,
    db: SessionDep,
    storage: StorageDep,
    who: ApiPrincipal,
    upload_id: str,
    index: int = Path(ge=0, description="0-based; part i holds bytes i*part_bytes onwards"),
    content_sha256: str | None = Header(None, pattern="^[0-9a-fA-F]{64}$",
                                        description="The part's SHA-256; a part that does not match is refused"),
) -> Response:
    """Send one part (its raw bytes as the body, exactly part_bytes long but the last). Parts may come in any
    order and be sent again; each is written in place as it streams in."""

    def lookup() -> Upload:
        row = service.get_upload(db, upload_id, tenant_id=who.tenant_id)
        db.expunge(row)  # keeps what was read; the rollback then holds no connection while the body streams in
        db.rollback()
        return row

    def record(digest: str) -> None:
        try:
            service.record_part(db, upload_id, index=index, sha256=digest)
            db.commit()
        except IntegrityError:  # the upload was deleted while this part streamed in
            db.rollback()
            raise NotFound(f"no upload with id '{upload_id}'", code="upload_not_found") from None

    def forget() -> None:
        service.forget_part(db, upload_id, index=index)
        db.commit()

    # The database work runs in the thread pool: this route is async (it reads the body as a stream) and the
    # sessions are synchronous.
    row = await run_in_threadpool(lookup)
    try:
        digest = await service.write_part(storage, row, index=index, body=request.stream(),
                                          declared_sha256=content_sha256)
    except BaseException as exc:
        if not (isinstance(exc, LowbitError) and exc.code in ("upload_closed", "upload_complete", "part_not_found")):
            await run_in_threadpool(forget)  # its bytes may be half overwritten: missing again
        raise
    await run_in_threadpool(record, digest)
    return Response(status_code=204)


@router.post("/{upload_id}/complete", status_code=201, response_model=ModelOut,
             responses=error_responses(400, 404, 409, 507))
def complete_upload(upload_id: str, request: Request, db: SessionDep, storage: StorageDep,
                    who: ApiPrincipal) -> ModelOut:
    """Finish the upload once every part arrived: the whole file's SHA-256 is checked and it becomes a model,
    checked like a one-shot upload. A file that is not a model lowbit takes is refused and the upload removed."""
    row = service.get_upload(db, upload_id, tenant_id=who.tenant_id, lock=True)
    try:
        model = service.complete(db, storage, row=row, settings=request.app.state.settings)
    except service.UploadRefused as refused:
        db.rollback()
        service.delete_upload(db, storage, row=service.get_upload(db, upload_id, tenant_id=who.tenant_id))
        db.commit()
        raise refused.error from None
    db.commit()
    return ModelOut.model_validate(model)


@router.delete("/{upload_id}", status_code=204, responses=error_responses(404))
def delete_upload(upload_id: str, db: SessionDep, storage: StorageDep, who: ApiPrincipal) -> Response:
    """Abandon an upload: its parts are removed (a model it became stays)."""
    service.delete_upload(db, storage, row=service.get_upload(db, upload_id, tenant_id=who.tenant_id))
    db.commit()
    return Response(status_code=204)
