from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient


def upload_model(client: TestClient, path: Path, name: str | None = None) -> dict[str, Any]:
    r = client.post("/api/v1/models", files={"file": (name or path.name, path.read_bytes())})
    assert r.status_code == 201, r.text
    return r.json()


def upload_dataset(client: TestClient, path: Path, name: str | None = None) -> dict[str, Any]:
    r = client.post("/api/v1/datasets", files={"file": (name or path.name, path.read_bytes())})
    assert r.status_code == 201, r.text
    return r.json()


def submit(client: TestClient, **body: Any) -> Any:
    return client.post("/api/v1/jobs", content=json.dumps(body), headers={"content-type": "application/json"})


def error_of(r: Any) -> str:
    body = r.json()
    assert set(body) == {"error"}, body
    assert body["error"]["message"], body
    return str(body["error"]["code"])
