"""A server bound to a non-loopback address requires API keys; `lowbit keys create` makes one that the API and
the lowbit client accept. Real `lowbit serve` and `lowbit keys` processes on one data directory."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.e2e.conftest import env_for, lowbit_cmd, start_serve


def test_public_bind_requires_keys_and_keys_create_makes_one(tmp_path: Path, zoo: dict[str, Path]) -> None:
    data = tmp_path / "data"
    proc, client = start_serve(data, tmp_path / "serve.log", "--host", "0.0.0.0", "--no-worker")
    try:
        assert "API keys required" in proc.tail()
        r = client.get("/api/v1/jobs")
        assert r.status_code == 401 and r.json()["error"]["code"] == "authentication_required"
        assert client.get("/", follow_redirects=False).headers["location"].startswith("/login")

        made = subprocess.run(lowbit_cmd("keys", "create", "--tenant", "acme"), env=env_for(data),
                              capture_output=True, text=True, timeout=60, check=True)
        key = made.stdout.strip()
        assert key.startswith("lb_") and "shown only this once" in made.stderr
        listed = subprocess.run(lowbit_cmd("keys", "list"), env=env_for(data), capture_output=True, text=True,
                                timeout=60, check=True).stdout
        assert "acme" in listed and key not in listed and key.split("_", 2)[2] not in listed

        auth = {"Authorization": f"Bearer {key}"}
        up = client.post("/api/v1/models", files={"file": ("mlp.onnx", zoo["mlp"].read_bytes())}, headers=auth)
        assert up.status_code == 201, up.text

        server = str(client.base_url)
        cli_env = env_for(data, LOWBIT_SERVER=server)
        refused = subprocess.run(lowbit_cmd("jobs"), env=cli_env, capture_output=True, text=True, timeout=60)
        assert refused.returncode != 0 and "authentication_required" in refused.stderr + refused.stdout
        cli_env["LOWBIT_API_KEY"] = key
        ok = subprocess.run(lowbit_cmd("jobs", "--json"), env=cli_env, capture_output=True, text=True, timeout=60)
        assert ok.returncode == 0, ok.stderr
    finally:
        client.close()
        proc.stop()


def test_loopback_bind_is_keyless_and_says_so(tmp_path: Path) -> None:
    proc, client = start_serve(tmp_path / "data", tmp_path / "serve.log", "--no-worker")
    try:
        assert client.get("/api/v1/jobs").status_code == 200
        assert "keyless: bound to 127.0.0.1" in proc.tail()
    finally:
        client.close()
        proc.stop()
