"""Webhooks: one signed POST per finished job, retried with backoff, recorded on the job; never the job's
outcome. The receivers are real HTTP servers on 127.0.0.1; jobs run through the worker's code path."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from app.jobs.models import WebhookDelivery
from app.webhooks import SECRET_FILE, sign, verify, webhook_secret
from tests.app.conftest import Harness
from tests.app.helpers import error_of, submit, upload_model
from tests.e2e.conftest import free_port
from tests.httpd import Received, receiver


def _check_signature(secret: str, got: Received) -> dict[str, Any]:
    """Verify the delivery the way a receiver would, with nothing but hmac: t=<unix>,v1=<hex> over
    '<t>.' + body, and a fresh timestamp."""
    parts = dict(p.split("=", 1) for p in got.headers["x-lowbit-signature"].split(","))
    ts = int(parts["t"])
    assert abs(time.time() - ts) < 120
    expected = hmac.new(secret.encode(), f"{ts}.".encode() + got.body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(parts["v1"], expected)
    assert verify(secret, got.headers["x-lowbit-signature"], got.body)
    assert got.headers["content-type"] == "application/json"
    body: dict[str, Any] = json.loads(got.body)
    assert got.headers["x-lowbit-event"] == body["event"]
    assert got.headers["x-lowbit-delivery"] == body["delivery_id"]
    return body


def test_one_signed_delivery_per_finished_job(api: Harness, zoo: dict[str, Path]) -> None:
    m = upload_model(api.client, zoo["mlp"])
    with receiver() as rec:
        done = submit(api.client, model_id=m["id"], recipe="int8_dynamic", callback_url=rec.url + "/hook?n=1").json()
        cancelled = submit(api.client, model_id=m["id"], recipe="int8_dynamic", callback_url=rec.url + "/hook?n=2")
        cancelled_id = cancelled.json()["id"]
        silent = submit(api.client, model_id=m["id"], recipe="int8_dynamic").json()
        assert done["callback_url"] == rec.url + "/hook?n=1" and silent["callback_url"] is None
        assert api.client.post(f"/api/v1/jobs/{cancelled_id}/cancel").status_code == 202
        api.queue.enqueued.append(api.queue.enqueued[0])  # the broker delivers the first message twice
        # The cancelled job's message still reaches a worker, which skips the job but sends its webhook.
        assert api.run_queued() == ["succeeded", "skipped", "succeeded", "skipped"]
        received = list(rec.received)

    secret = webhook_secret(api.settings)
    secret_file = api.settings.data_dir / SECRET_FILE
    assert secret_file.read_text().strip() == secret and len(secret) >= 32
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600

    assert sorted(r.path for r in received) == ["/hook?n=1", "/hook?n=2"], received
    bodies = {b["job"]["id"]: b for b in (_check_signature(secret, r) for r in received)}
    ok = bodies[done["id"]]
    assert ok["event"] == "job.succeeded" and ok["job"]["status"] == "succeeded"
    report = api.client.get(f"/api/v1/jobs/{done['id']}/report").json()
    assert ok["summary"]["size"] == report["size"] and ok["summary"]["latency"] == report["latency"]
    assert ok["summary"]["accuracy"] == report["accuracy"]
    assert "deliveries" not in ok["job"] and ok["job"]["links"]["artifact"].endswith("/artifact")
    gone = bodies[cancelled_id]
    assert gone["event"] == "job.cancelled" and gone["summary"] is None

    for job_id, event, body in ((done["id"], "job.succeeded", ok), (cancelled_id, "job.cancelled", gone)):
        job = api.client.get(f"/api/v1/jobs/{job_id}").json()
        [d] = job["deliveries"]
        assert d["id"] == body["delivery_id"] and d["event"] == event and d["status"] == "delivered"
        assert d["attempts"] == 1 and d["last_status_code"] == 200 and d["last_error"] is None
        assert d["delivered_at"] and d["url"] == job["callback_url"]
    assert api.client.get(f"/api/v1/jobs/{silent['id']}").json()["deliveries"] == []
    # Deleting a job deletes its delivery records with it.
    assert api.client.delete(f"/api/v1/jobs/{done['id']}").status_code == 204
    with api.factory() as s:
        left = s.scalars(sa.select(WebhookDelivery.job_id)).all()
    assert left == [cancelled_id]

    # A tampered body, a stale timestamp and a wrong secret are all refused.
    r = received[0]
    header = r.headers["x-lowbit-signature"]
    assert not verify(secret, header, r.body + b" ")
    assert not verify(secret, header, r.body, now=time.time() + 3600)
    assert not verify("not-the-secret", header, r.body)
    assert not verify(secret, None, r.body) and not verify(secret, "v1=abc", r.body)
    old = int(time.time()) - 3600
    assert not verify(secret, sign(secret, old, r.body), r.body)
    assert verify(secret, sign(secret, old, r.body), r.body, tolerance_s=4000)

    # The operator reads the same secret with `lowbit webhook-secret`.
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOWBIT_")}
    env["LOWBIT_DATA_DIR"] = str(api.settings.data_dir)
    out = subprocess.run([sys.executable, "-m", "app.cli", "webhook-secret"], env=env, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    assert out.strip() == secret


def test_retries_with_backoff_and_records_every_attempt(api: Harness, zoo: dict[str, Path]) -> None:
    api.settings.webhook_retry_delays_s = [0.0, 0.1, 0.2]
    api.settings.webhook_secret = "s3cret-from-the-environment"
    m = upload_model(api.client, zoo["mlp"])
    closed_port = f"http://127.0.0.1:{free_port()}/hook"
    with receiver(500, 502) as flaky, receiver(503, 503, 503) as broken:
        third = submit(api.client, model_id=m["id"], recipe="int8_dynamic", callback_url=flaky.url).json()
        never = submit(api.client, model_id=m["id"], recipe="int8_dynamic", callback_url=broken.url).json()
        nobody = submit(api.client, model_id=m["id"], recipe="int8_dynamic", callback_url=closed_port).json()
        assert api.run_queued() == ["succeeded"] * 3  # a webhook never changes the job's outcome
        got, refused = list(flaky.received), list(broken.received)

    # Fails twice, gets it on the third try: the same delivery, each attempt signed afresh, after the backoff.
    assert len(got) == 3
    bodies = [_check_signature("s3cret-from-the-environment", r) for r in got]
    assert len({b["delivery_id"] for b in bodies}) == 1 and bodies[0]["job"]["id"] == third["id"]
    assert got[1].at - got[0].at >= 0.1 and got[2].at - got[1].at >= 0.2
    [d] = api.client.get(f"/api/v1/jobs/{third['id']}").json()["deliveries"]
    assert (d["status"], d["attempts"], d["last_status_code"], d["last_error"]) == ("delivered", 3, 200, None)

    assert len(refused) == 3
    [d] = api.client.get(f"/api/v1/jobs/{never['id']}").json()["deliveries"]
    assert (d["status"], d["attempts"], d["last_status_code"], d["delivered_at"]) == ("failed", 3, 503, None)
    assert d["last_error"].startswith("HTTP 503")

    [d] = api.client.get(f"/api/v1/jobs/{nobody['id']}").json()["deliveries"]
    assert (d["status"], d["attempts"], d["last_status_code"]) == ("failed", 3, None)
    assert "ConnectError" in d["last_error"]
    for job_id in (third["id"], never["id"], nobody["id"]):
        assert api.client.get(f"/api/v1/jobs/{job_id}").json()["status"] == "succeeded"


@pytest.mark.parametrize("url", ["ftp://example.com/hook", "example.com/hook", "http://", "javascript:alert(1)",
                                 "http://exa mple.com/", "https://example.com:port/", "http://x/" + "a" * 2100])
def test_callback_url_must_be_http_or_https(sqlite_api: Harness, zoo: dict[str, Path], url: str) -> None:
    m = upload_model(sqlite_api.client, zoo["mlp"])
    r = submit(sqlite_api.client, model_id=m["id"], recipe="int8_dynamic", callback_url=url)
    assert r.status_code == 422 and error_of(r) == "invalid_request"
    assert "callback_url" in r.json()["error"]["message"]
    assert sqlite_api.queue.enqueued == []


def test_callbacks_to_internal_addresses_are_refused_by_default(api: Harness, zoo: dict[str, Path]) -> None:
    """Without LOWBIT_WEBHOOK_ALLOW_PRIVATE the worker never calls a loopback/private address: it cannot be
    used to reach or scan the internal network."""
    api.settings.webhook_allow_private = False
    m = upload_model(api.client, zoo["mlp"])
    with receiver() as rec:
        job = submit(api.client, model_id=m["id"], recipe="int8_dynamic", callback_url=rec.url + "/hook").json()
        assert api.run_queued() == ["succeeded"]
        assert rec.received == []
    (delivery,) = api.client.get(f"/api/v1/jobs/{job['id']}").json()["deliveries"]
    assert delivery["status"] == "failed" and delivery["attempts"] == 0
    assert "non-public address" in delivery["last_error"]


def test_a_webhook_whose_worker_died_before_sending_is_sent_by_the_sweep(
        api: Harness, zoo: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from datetime import timedelta

    from app.db import utcnow
    from app.jobs.models import Job
    from app.webhooks import notify_missed
    from worker import tasks

    m = upload_model(api.client, zoo["mlp"])
    with receiver() as rec:
        job_id = submit(api.client, model_id=m["id"], recipe="int8_dynamic", callback_url=rec.url + "/h").json()["id"]
        # The worker records the end, then dies before its webhook goes out (the chaos test's SIGKILL).
        monkeypatch.setattr(tasks, "notify", lambda *a, **k: None)
        assert api.run_queued() == ["succeeded"]
        assert rec.received == []
        assert notify_missed(api.factory, api.settings, older_than_s=30) == []  # its own worker's turn still
        with api.factory.begin() as s:
            row = s.get(Job, job_id)
            assert row is not None
            row.finished_at = utcnow() - timedelta(seconds=60)
        assert notify_missed(api.factory, api.settings, older_than_s=30) == [job_id]
        assert notify_missed(api.factory, api.settings, older_than_s=30) == []  # once only
        received = list(rec.received)
    assert [json.loads(r.body)["event"] for r in received] == ["job.succeeded"]
    [d] = api.client.get(f"/api/v1/jobs/{job_id}").json()["deliveries"]
    assert d["status"] == "delivered" and d["event"] == "job.succeeded"
