"""The pages for the 4-bit and fp16 recipes: form choices, bits per weight, the calibration baseline."""

from __future__ import annotations

import re
from pathlib import Path

from tests.app.conftest import Harness


def test_form_offers_every_recipe_and_4bit_choices(sqlite_api: Harness) -> None:
    page = sqlite_api.client.get("/").text
    for recipe in ("int8_static", "int8_dynamic", "int4_weight_only", "fp16"):
        assert f'value="{recipe}"' in page
    assert 'name="block_size"' in page and "disabled" not in re.search(r'<select name="block_size">', page).group(0)
    for algorithm in ("clip_search", "gptq", "hqq", "rtn"):
        assert f'value="{algorithm}"' in page


def test_int4_job_through_the_form_shows_bits_per_weight_and_the_baseline(sqlite_api: Harness,
                                                                         zoo: dict[str, Path]) -> None:
    api = sqlite_api
    r = api.client.post(
        "/jobs/new",
        data={"recipe": "int4_weight_only", "algorithm": "clip_search", "block_size": "16", "csrf_token": api.csrf()},
        files={"model": ("tf.onnx", zoo["tf"].read_bytes()), "calibration": ("tok.npz", zoo["tf_data"].read_bytes())},
        follow_redirects=False,
    )
    assert r.status_code == 303, r.text
    job_id = r.headers["location"].rsplit("/", 1)[1]
    assert api.run_queued() == ["succeeded"]
    report = api.client.get(f"/api/v1/jobs/{job_id}/report").json()
    assert report["options"]["block_size"] == 16 and report["calibration"]["algorithm"] == "clip_search"
    page = api.client.get(f"/jobs/{job_id}").text
    assert f'data-key="size.bits_per_weight">{report["size"]["bits_per_weight"]}' in page
    assert 'id="baselines"' in page and "rtn, block 16" in page
    base = report["accuracy"]["baselines"][0]["outputs"][0]["cosine"]
    assert f'data-key="accuracy.baselines.0.outputs.0.cosine">{base}' in page
    assert page.count(">int4<") >= 1


def test_form_refuses_calibrated_4bit_without_data(sqlite_api: Harness, zoo: dict[str, Path]) -> None:
    r = sqlite_api.client.post(
        "/jobs/new", data={"recipe": "int4_weight_only", "algorithm": "gptq", "block_size": "32",
                           "csrf_token": sqlite_api.csrf()},
        files={"model": ("tf.onnx", zoo["tf"].read_bytes())}, follow_redirects=False,
    )
    assert r.status_code == 422 and "learns from your data" in r.text
