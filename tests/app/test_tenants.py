"""API keys, tenant isolation, browser sessions with CSRF, and per-tenant limits, on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import re
import uuid
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from app.settings import Settings
from app.tenants import service as tenants
from app.tenants.models import ApiKey
from tests.app.conftest import Harness
from tests.app.helpers import error_of

SESSION = "lowbit_session"


def new_key(h: Harness, tenant: str, **limits: int) -> str:
    with h.factory() as db:
        _, key = tenants.create_key(db, tenant, max_active_jobs=limits.get("max_active_jobs"),
                                    uploads_per_minute=limits.get("uploads_per_minute"))
        db.commit()
    return key


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def upload(h: Harness, key: str, path: Path, kind: str = "models") -> dict[str, Any]:
    r = h.client.post(f"/api/v1/{kind}", files={"file": (path.name, path.read_bytes())}, headers=bearer(key))
    assert r.status_code == 201, r.text
    return dict(r.json())


def submit(h: Harness, key: str, **body: Any) -> Any:
    return h.client.post("/api/v1/jobs", json=body, headers=bearer(key))


@pytest.mark.parametrize("host, required", [("127.0.0.1", False), ("localhost", False), ("::1", False),
                                            ("127.0.0.2", False), ("0.0.0.0", True), ("10.1.2.3", True),
                                            ("::", True), ("lowbit.example.com", True)])
def test_keys_are_required_off_loopback(host: str, required: bool) -> None:
    assert Settings(host=host).keys_required is required
    assert Settings(host=host, require_keys=True).keys_required is True


def test_requests_without_a_valid_key_are_401(keyed_api: Harness) -> None:
    c = keyed_api.client
    for method, path in (("get", "/api/v1/jobs"), ("get", f"/api/v1/jobs/{uuid.uuid4()}"),
                         ("post", "/api/v1/models"), ("get", "/metrics")):
        r = getattr(c, method)(path)
        assert r.status_code == 401 and error_of(r) == "authentication_required", (path, r.text)
        assert r.headers["www-authenticate"].startswith("Bearer")
    key = new_key(keyed_api, "acme")
    wrong_secret = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
    for header in (f"Bearer {wrong_secret}", "Bearer lb_000000000000_" + "x" * 43, "Bearer nonsense"):
        r = c.get("/api/v1/jobs", headers={"Authorization": header})
        assert r.status_code == 401 and error_of(r) == "invalid_api_key", r.text
    r = c.get("/api/v1/jobs", headers={"Authorization": f"Basic {key}"})
    assert r.status_code == 401 and error_of(r) == "invalid_authorization"
    assert c.get("/api/v1/jobs", headers=bearer(key)).status_code == 200
    # Health probes and the API description stay open.
    assert c.get("/healthz").status_code == 200 and c.get("/openapi.json").status_code == 200


def test_keys_are_stored_hashed_and_can_be_revoked(keyed_api: Harness) -> None:
    key = new_key(keyed_api, "acme")
    with keyed_api.factory() as db:
        rows = list(db.scalars(sa.select(ApiKey)))
        dumped = repr([(r.prefix, r.key_hash) for r in rows])
    assert len(rows) == 1 and rows[0].key_hash == hashlib.sha256(key.encode()).hexdigest()
    secret = key.split("_", 2)[2]  # the secret itself may contain "_" (URL-safe base64)
    assert len(secret) == 43 and secret not in dumped  # the secret part is nowhere in the table
    assert keyed_api.client.get("/api/v1/jobs", headers=bearer(key)).status_code == 200
    with keyed_api.factory() as db:
        tenants.revoke_key(db, f"lb_{rows[0].prefix}")
        db.commit()
    r = keyed_api.client.get("/api/v1/jobs", headers=bearer(key))
    assert r.status_code == 401 and error_of(r) == "invalid_api_key"


def test_another_tenants_resources_answer_exactly_like_missing_ones(keyed_api: Harness,
                                                                      zoo: dict[str, Path]) -> None:
    h = keyed_api
    a, b = new_key(h, "acme"), new_key(h, "globex")
    model = upload(h, a, zoo["mlp"])
    data = upload(h, a, zoo["mlp_data"], "datasets")
    r = submit(h, a, model_id=model["id"], calibration_dataset_id=data["id"], recipe="int8_static")
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    assert h.run_queued() == ["succeeded"]
    assert h.client.get(f"/api/v1/jobs/{job_id}/artifact", headers=bearer(a)).status_code == 200

    def same_as_missing(path: str, real_id: str, method: str = "get") -> None:
        theirs = getattr(h.client, method)(path.format(real_id), headers=bearer(b))
        missing_id = str(uuid.uuid4())
        missing = getattr(h.client, method)(path.format(missing_id), headers=bearer(b))
        assert theirs.status_code == missing.status_code == 404, (path, theirs.text)
        assert theirs.json() == {"error": {**missing.json()["error"],
                                           "message": missing.json()["error"]["message"].replace(missing_id,
                                                                                                 real_id)}}

    same_as_missing("/api/v1/models/{}", model["id"])
    same_as_missing("/api/v1/datasets/{}", data["id"])
    for suffix in ("", "/artifact", "/report", "/events"):
        same_as_missing("/api/v1/jobs/{}" + suffix, job_id)
    same_as_missing("/api/v1/jobs/{}/cancel", job_id, "post")
    same_as_missing("/api/v1/jobs/{}/page-link", job_id, "post")
    same_as_missing("/api/v1/jobs/{}", job_id, "delete")
    # Nor can they be found by content or listed, or used in a job of B's.
    assert h.client.get("/api/v1/jobs", headers=bearer(b)).json()["items"] == []
    assert h.client.get(f"/api/v1/models?sha256={model['sha256']}", headers=bearer(b)).json()["items"] == []
    assert h.client.get(f"/api/v1/datasets?sha256={data['sha256']}", headers=bearer(b)).json()["items"] == []
    r = submit(h, b, model_id=model["id"], recipe="int8_dynamic")
    assert r.status_code == 404 and error_of(r) == "model_not_found"
    own = upload(h, b, zoo["mlp"])
    r = submit(h, b, model_id=own["id"], calibration_dataset_id=data["id"], recipe="int8_static")
    assert r.status_code == 404 and error_of(r) == "dataset_not_found"
    # A's job is untouched by B's attempts, and A still sees everything.
    job = h.client.get(f"/api/v1/jobs/{job_id}", headers=bearer(a)).json()
    assert job["status"] == "succeeded"
    assert [j["id"] for j in h.client.get("/api/v1/jobs", headers=bearer(a)).json()["items"]] == [job_id]


def _sign_in(client: TestClient, key: str, next_path: str = "/") -> Any:
    return client.post("/login", data={"api_key": key, "next": next_path}, follow_redirects=False)


def test_browser_sign_in_uses_a_cookie_not_the_key_and_forms_need_the_csrf_token(keyed_api: Harness,
                                                                                   zoo: dict[str, Path]) -> None:
    h = keyed_api
    key = new_key(h, "acme")
    job_id = submit(h, key, model_id=upload(h, key, zoo["mlp"])["id"], recipe="int8_dynamic").json()["id"]
    r = h.client.get(f"/jobs/{job_id}", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == f"/login?next=%2Fjobs%2F{job_id}"
    assert 'name="api_key"' in h.client.get(r.headers["location"]).text
    bad = _sign_in(h.client, key[:-1] + ("x" if key[-1] != "x" else "y"))
    assert bad.status_code == 401 and "not valid" in bad.text and SESSION not in bad.headers.get("set-cookie", "")
    ok = _sign_in(h.client, key, f"/jobs/{job_id}")
    assert ok.status_code == 303 and ok.headers["location"] == f"/jobs/{job_id}"
    cookie = ok.headers["set-cookie"]
    assert cookie.startswith(f"{SESSION}=") and "HttpOnly" in cookie and "SameSite=lax" in cookie
    assert key not in cookie and key.split("_", 2)[2] not in ok.headers["location"]
    page = h.client.get(f"/jobs/{job_id}")
    assert page.status_code == 200 and "Sign out (acme)" in page.text
    # The page's live updates and downloads (GET) work with the cookie; API writes do not.
    assert h.client.get(f"/api/v1/jobs/{job_id}").status_code == 200
    r = h.client.post(f"/api/v1/jobs/{job_id}/cancel")
    assert r.status_code == 401
    # Page forms need the token bound to this session.
    r = h.client.post(f"/jobs/{job_id}/cancel", follow_redirects=False)
    assert r.status_code == 403 and "CSRF" in r.text
    r = h.client.post(f"/jobs/{job_id}/cancel", data={"csrf_token": "forged"}, follow_redirects=False)
    assert r.status_code == 403
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert token is not None
    r = h.client.post(f"/jobs/{job_id}/cancel", data={"csrf_token": token.group(1)}, follow_redirects=False)
    assert r.status_code == 303
    assert h.client.get(f"/api/v1/jobs/{job_id}", headers=bearer(key)).json()["status"] == "cancelled"
    # A forged or tampered cookie is no session.
    payload, sig = h.client.cookies[SESSION].split(".")
    h.client.cookies.set(SESSION, payload + "." + sig[::-1])
    assert h.client.get("/", follow_redirects=False).status_code == 303
    # Signing in never redirects off this server.
    for target in ("//evil.example/x", "https://evil.example/", "/\\evil.example"):
        assert _sign_in(h.client, key, target).headers["location"] == "/"


def test_revoking_a_key_ends_its_browser_sessions(keyed_api: Harness) -> None:
    key = new_key(keyed_api, "acme")
    assert _sign_in(keyed_api.client, key).status_code == 303
    assert keyed_api.client.get("/", follow_redirects=False).status_code == 200
    with keyed_api.factory() as db:
        tenants.revoke_key(db, key.split("_")[1])
        db.commit()
    assert keyed_api.client.get("/", follow_redirects=False).status_code == 303


def test_a_signed_page_link_opens_the_job_in_a_fresh_browser(keyed_api: Harness, zoo: dict[str, Path]) -> None:
    h = keyed_api
    key = new_key(h, "acme")
    job_id = submit(h, key, model_id=upload(h, key, zoo["mlp"])["id"], recipe="int8_dynamic").json()["id"]
    r = h.client.post(f"/api/v1/jobs/{job_id}/page-link", headers=bearer(key))
    assert r.status_code == 200 and r.json()["expires_in_s"] == 300
    url = r.json()["url"]
    assert url.startswith("/login/link?token=") and key.split("_", 2)[2] not in url
    with TestClient(h.client.app) as browser:
        opened = browser.get(url, follow_redirects=False)
        assert opened.status_code == 303 and opened.headers["location"] == f"/jobs/{job_id}"
        assert browser.get(f"/jobs/{job_id}").status_code == 200
        assert browser.get(url.replace("token=", "token=x")).status_code == 401
    # A link token is not a session cookie (signed for another purpose).
    with TestClient(h.client.app) as other:
        other.cookies.set(SESSION, url.split("token=")[1].replace("%3D", "="))
        assert other.get("/", follow_redirects=False).status_code == 303


def test_upload_rate_limit_is_per_tenant_with_retry_after(keyed_api: Harness, zoo: dict[str, Path]) -> None:
    h = keyed_api
    slow, other = new_key(h, "slow", uploads_per_minute=2), new_key(h, "other")
    upload(h, slow, zoo["mlp"])
    upload(h, slow, zoo["mlp_data"], "datasets")
    r = h.client.post("/api/v1/models", files={"file": ("m.onnx", zoo["mlp"].read_bytes())}, headers=bearer(slow))
    assert r.status_code == 429 and error_of(r) == "upload_rate_limited", r.text
    assert 1 <= int(r.headers["retry-after"]) <= 60 and "2 file(s) a minute" in r.json()["error"]["message"]
    # A multipart job submission counts its files too.
    r = h.client.post("/api/v1/jobs", files={"model": ("m.onnx", zoo["mlp"].read_bytes())},
                      data={"config": '{"recipe": "int8_dynamic"}'}, headers=bearer(slow))
    assert r.status_code == 429 and error_of(r) == "upload_rate_limited"
    upload(h, other, zoo["mlp"])  # another tenant is not slowed down
    # A single request with more files than the limit allows can never pass: a 422 that says what to do.
    one = new_key(h, "one-a-minute", uploads_per_minute=1)
    r = h.client.post("/api/v1/jobs", files={"model": ("m.onnx", zoo["mlp"].read_bytes()),
                                             "calibration": ("d.npz", zoo["mlp_data"].read_bytes())},
                      data={"config": '{"recipe": "int8_static"}'}, headers=bearer(one))
    assert r.status_code == 422 and error_of(r) == "upload_rate_limited" and "one at a time" in r.text


def test_active_job_limit_per_tenant(keyed_api: Harness, zoo: dict[str, Path]) -> None:
    h = keyed_api
    key = new_key(h, "acme", max_active_jobs=1)
    model = upload(h, key, zoo["mlp"])["id"]
    assert submit(h, key, model_id=model, recipe="int8_dynamic").status_code == 202
    r = submit(h, key, model_id=model, recipe="int8_dynamic")
    assert r.status_code == 429 and error_of(r) == "too_many_active_jobs" and r.headers["retry-after"] == "30"
    assert h.run_queued() == ["succeeded"]
    assert submit(h, key, model_id=model, recipe="int8_dynamic").status_code == 202


def test_keyless_server_still_separates_keyed_tenants(api: Harness, zoo: dict[str, Path]) -> None:
    key = new_key(api, "acme")
    mine = upload(api, key, zoo["mlp"])
    # Keyless requests are the local tenant: they do not see acme's model, and acme does not see theirs.
    assert api.client.get(f"/api/v1/models/{mine['id']}").status_code == 404
    local = api.client.post("/api/v1/models", files={"file": ("m.onnx", zoo["mlp"].read_bytes())}).json()
    assert api.client.get(f"/api/v1/models/{local['id']}", headers=bearer(key)).status_code == 404
    assert api.client.get(f"/api/v1/models/{mine['id']}", headers=bearer(key)).status_code == 200
    # A key that is sent is checked even here: a wrong one is refused, not treated as keyless.
    r = api.client.get("/api/v1/jobs", headers=bearer(key[:-2] + ("xx" if not key.endswith("xx") else "yy")))
    assert r.status_code == 401 and error_of(r) == "invalid_api_key"


def test_cross_site_form_posts_are_refused_even_at_sign_in(keyed_api: Harness, zoo: dict[str, Path]) -> None:
    """Login CSRF (signing a victim into the attacker's tenant) and forms posted from another site: the
    browser's Origin header names the other site, and the post is refused."""
    h = keyed_api
    key = new_key(h, "acme")
    evil = {"Origin": "https://evil.example"}
    r = h.client.post("/login", data={"api_key": key, "next": "/"}, headers=evil, follow_redirects=False)
    assert r.status_code == 403 and SESSION not in r.headers.get("set-cookie", "")
    own = {"Origin": str(h.client.base_url).rstrip("/")}
    r = h.client.post("/login", data={"api_key": key, "next": "/"}, headers=own, follow_redirects=False)
    assert r.status_code == 303 and r.headers["set-cookie"].startswith(SESSION)
    job_id = submit(h, key, model_id=upload(h, key, zoo["mlp"])["id"], recipe="int8_dynamic").json()["id"]
    token = re.search(r'name="csrf_token" value="([^"]+)"', h.client.get(f"/jobs/{job_id}").text)
    assert token is not None
    r = h.client.post(f"/jobs/{job_id}/cancel", data={"csrf_token": token.group(1)}, headers=evil,
                      follow_redirects=False)
    assert r.status_code == 403
    assert h.client.get(f"/api/v1/jobs/{job_id}").json()["status"] == "queued"
    r = h.client.post(f"/jobs/{job_id}/cancel", data={"csrf_token": token.group(1)}, headers=own,
                      follow_redirects=False)
    assert r.status_code == 303
