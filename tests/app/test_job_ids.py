"""Short job ids: the pages show a job's first 8 characters, and the client commands take them (or any longer
prefix), resolved through GET /api/v1/jobs?id_prefix=..."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from app.cli import main
from app.client import cli as client_cli
from app.client.core import Client
from app.client.errors import LowbitClientError
from app.jobs.models import Job
from tests.app.conftest import Harness
from tests.app.helpers import error_of, submit, upload_model

SHARED = "abcdef01"  # two jobs' ids begin with it


def _jobs(api: Harness, zoo: dict[str, Path]) -> list[str]:
    """Three queued jobs; the last two get ids that share their first 8 characters."""
    model = upload_model(api.client, zoo["mlp"])
    ids = []
    for _ in range(3):
        r = submit(api.client, model_id=model["id"], recipe="int8_dynamic")
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])
    with api.factory.begin() as s:
        for i in (1, 2):
            # Their 10th characters differ on purpose: the tests resolve a 10-character prefix of one of them.
            new = SHARED + ids[i][8] + "12"[i - 1] + ids[i][10:]
            s.execute(sa.update(Job).where(Job.id == ids[i]).values(id=new))
            ids[i] = new
    return ids


def test_the_api_lists_jobs_by_id_prefix(api: Harness, zoo: dict[str, Path]) -> None:
    ids = _jobs(api, zoo)

    def listed(prefix: str) -> list[str]:
        r = api.client.get("/api/v1/jobs", params={"id_prefix": prefix})
        assert r.status_code == 200, r.text
        return sorted(j["id"] for j in r.json()["items"])

    assert listed(ids[0][:8]) == [ids[0]]
    assert listed(ids[0].upper()) == [ids[0]]
    assert listed(SHARED) == sorted(ids[1:])
    assert listed(ids[1][:13]) == [ids[1]]
    assert listed("ffffffff") == [i for i in ids if i.startswith("ffffffff")]  # almost surely none
    r = api.client.get("/api/v1/jobs", params={"id_prefix": "abc%"})
    assert r.status_code == 422 and error_of(r) == "invalid_id_prefix"


def test_the_client_resolves_a_unique_prefix(api: Harness, zoo: dict[str, Path]) -> None:
    ids = _jobs(api, zoo)
    client = Client("http://testserver", transport=api.client._transport)
    assert client.resolve_job_id(ids[0]) == ids[0]
    assert client.resolve_job_id(ids[0][:8]) == ids[0]
    assert client.resolve_job_id(" " + ids[0][:12].upper()) == ids[0]
    assert client.resolve_job_id(ids[2][:10]) == ids[2]
    with pytest.raises(LowbitClientError) as e:
        client.resolve_job_id(SHARED)
    assert e.value.code == "ambiguous_job_id" and ids[1] in e.value.message and ids[2] in e.value.message
    with pytest.raises(LowbitClientError) as e:
        client.resolve_job_id(ids[0][:7])  # shorter than the pages show: too easy to hit the wrong job
    assert e.value.code == "invalid_job_id" and "8 characters" in e.value.message
    with pytest.raises(LowbitClientError) as e:
        client.resolve_job_id("00000000" if not ids[0].startswith("00000000") else "11111111")
    assert e.value.code == "job_not_found"


def test_status_and_cancel_take_the_short_id(api: Harness, zoo: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    ids = _jobs(api, zoo)
    monkeypatch.setattr(client_cli, "_client", lambda args: Client("http://testserver",
                                                                    transport=api.client._transport))
    assert main(["status", ids[0][:8]]) == client_cli.EXIT_OK
    assert capsys.readouterr().out.startswith(f"{ids[0]}  queued")
    assert main(["cancel", ids[2][:12]]) == client_cli.EXIT_OK
    assert capsys.readouterr().out.startswith(f"{ids[2]}  cancelled")
    assert api.client.get(f"/api/v1/jobs/{ids[1]}").json()["status"] == "queued"
    assert main(["status", SHARED]) == client_cli.EXIT_REFUSED
    err = capsys.readouterr().err
    assert err.startswith(f"lowbit: error [ambiguous_job_id]: '{SHARED}' is the beginning of several job ids")
