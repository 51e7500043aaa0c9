"""Re-uploading is free: a client asks by SHA-256 first and gets the stored model or dataset back."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from app.datasets.models import Dataset
from app.modelfiles.models import ModelFile
from tests.app.conftest import Harness
from tests.app.helpers import error_of, upload_dataset, upload_model


@pytest.mark.parametrize("kind", ["models", "datasets"])
def test_lookup_by_sha256(api: Harness, zoo: dict[str, Path], kind: str) -> None:
    path = zoo["mlp"] if kind == "models" else zoo["mlp_data"]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    url = f"/api/v1/{kind}"
    assert api.client.get(url, params={"sha256": digest}).json() == {"items": []}

    stored = (upload_model if kind == "models" else upload_dataset)(api.client, path)
    for asked in (digest, digest.upper()):
        items = api.client.get(url, params={"sha256": asked}).json()["items"]
        assert [i["id"] for i in items] == [stored["id"]] and items[0] == stored
    assert api.client.get(url, params={"sha256": "0" * 64}).json() == {"items": []}
    for bad in ("xyz", digest[:-1], digest + "0"):
        r = api.client.get(url, params={"sha256": bad})
        assert r.status_code == 422 and error_of(r) == "invalid_request"
    r = api.client.get(url)
    assert r.status_code == 422 and "sha256" in r.json()["error"]["message"]

    # A stored row whose file has gone from storage is not offered: the client uploads again.
    with api.factory() as s:
        row = s.get(ModelFile, stored["id"]) if kind == "models" else s.get(Dataset, stored["id"])
        assert row is not None
        Path(row.storage_path).unlink()
    assert api.client.get(url, params={"sha256": digest}).json() == {"items": []}
    again = (upload_model if kind == "models" else upload_dataset)(api.client, path)
    assert api.client.get(url, params={"sha256": digest}).json()["items"][0]["id"] == again["id"] != stored["id"]
