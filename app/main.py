"""The FastAPI application factory."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from app.auth import SignInRequired
from app.datasets.routes import router as datasets_router
from app.db import make_engine, make_sessionmaker
from app.errors import install_handlers
from app.health.routes import router as health_router
from app.jobs.routes import router as jobs_router
from app.jobs.routes import schemas_router
from app.limits import BodyLimit
from app.metrics.routes import router as metrics_router
from app.modelfiles.routes import router as models_router
from app.pages.routes import STATIC_DIR, sign_in_first
from app.pages.routes import router as pages_router
from app.queue import CeleryQueue, JobQueue
from app.resumable.routes import router as uploads_router
from app.security import SecurityHeaders
from app.settings import Settings, get_settings
from app.storage import Storage
from app.tenants.service import session_secret


def create_app(settings: Settings | None = None, queue: JobQueue | None = None) -> FastAPI:
    s = settings or get_settings()
    s.data_dir.mkdir(parents=True, exist_ok=True)
    app = FastAPI(
        title="lowbit",
        version="0.1.0",
        description="Quantize ML models as jobs: upload a model and calibration data, get back an int8 model "
        "and an honest report of what it cost.",
    )
    engine = make_engine(s.resolved_database_url)
    app.state.settings = s
    app.state.engine = engine
    app.state.sessionmaker = make_sessionmaker(engine)
    app.state.storage = Storage(s.data_dir)
    app.state.queue = queue or CeleryQueue(s)
    app.state.keys_required = s.keys_required
    app.state.session_secret = session_secret(s)
    install_handlers(app)
    app.add_exception_handler(SignInRequired, sign_in_first)  # the pages' sign-in redirect
    for r in (models_router, uploads_router, datasets_router, jobs_router, schemas_router, health_router,
              metrics_router, pages_router):
        app.include_router(r)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    docs = tuple(p for p in (app.docs_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url) if p)
    app.add_middleware(BodyLimit)  # inside SecurityHeaders, so its 413s carry the headers too
    app.add_middleware(SecurityHeaders, exempt_from_csp=docs)
    return app
