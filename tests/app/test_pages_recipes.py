"""The pages for the 4-bit and fp16 recipes: form choices, bits per weight, the calibration baseline; int8_static's
SmoothQuant, cross-layer equalization, bias-correction and 4-bit weight lines."""

from __future__ import annotations

import re
from pathlib import Path

from app.pages.present import smoothquant_lines
from tests.app.conftest import Harness
from worker.engine.report import SmoothQuant, SmoothQuantCheck


def test_form_offers_every_recipe_and_4bit_choices(sqlite_api: Harness) -> None:
    page = sqlite_api.client.get("/").text
    for recipe in ("int8_static", "int8_dynamic", "int4_weight_only", "fp16"):
        assert f'value="{recipe}"' in page
    select = re.search(r'<select name="block_size">', page)
    assert 'name="block_size"' in page and select is not None and "disabled" not in select.group(0)
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


def test_static_job_page_says_what_smoothquant_did(sqlite_api: Harness, zoo: dict[str, Path]) -> None:
    """The calibration card has a SmoothQuant line: here the tiny transformer's inputs have no outlier channels,
    so auto left it alone and says why, with the figure it decided on."""
    api = sqlite_api
    r = api.client.post(
        "/jobs/new", data={"recipe": "int8_static", "csrf_token": api.csrf()},
        files={"model": ("tf.onnx", zoo["tf"].read_bytes()), "calibration": ("tok.npz", zoo["tf_data"].read_bytes())},
        follow_redirects=False,
    )
    assert r.status_code == 303, r.text
    job_id = r.headers["location"].rsplit("/", 1)[1]
    assert api.run_queued() == ["succeeded"]
    report = api.client.get(f"/api/v1/jobs/{job_id}/report").json()
    sq = report["smoothquant"]
    assert sq["mode"] == "auto" and sq["enabled"] is False and sq["candidates"] > 0
    page = api.client.get(f"/jobs/{job_id}").text
    line = re.search(r'<p data-field="smoothquant">(.*?)</p>', page, re.S)
    assert line is not None and "Off (auto, alpha 0.5)" in line.group(1)
    assert f"({sq['largest_spread_before']:.1f}x the median channel)" in line.group(1)
    # The same card says what option float_index_math kept in float (here Shape, Gather and arithmetic on the
    # dimension it reads: 6 nodes).
    im = report["index_math"]
    line = re.search(r'<p data-field="index-math">(.*?)</p>', page, re.S)
    assert im["enabled"] and im["nodes"] == 6 and line is not None, im
    assert f"{im['nodes']} node(s) kept in float ({im['shape_nodes']} computing from shapes" in line.group(1)


def test_smoothquant_lines_say_how_many_were_smoothed_and_how() -> None:
    section = SmoothQuant(enabled=True, reason="option smoothquant is on", mode="on", alpha=0.8, spread_threshold=50.0,
                          candidates=36, samples=48, largest_spread_before=19.36, matmuls_smoothed=36, groups=24,
                          folded=0, muls_inserted=24, largest_spread_after=4.03,
                          check=SmoothQuantCheck(samples=8, max_relative_error=6.97e-7, min_cosine=1.0, passed=True))
    assert smoothquant_lines(section) == [
        "On (on, alpha 0.8): option smoothquant is on.",
        "36 MatMul/Gemm smoothed over 24 input(s): 0 folded into their producer, 24 Mul inserted; largest channel "
        "spread 19.4x \u2192 4.03x the median channel; smoothed float model vs the prepared one: max relative error "
        "7e-07, cosine 1.0000000.",
    ]
    assert smoothquant_lines(None) == []


def test_static_job_page_says_what_equalization_and_bias_correction_did(sqlite_api: Harness,
                                                                        zoo: dict[str, Path]) -> None:
    """The calibration card has a line for each: the conv net has Conv -> ReLU -> Conv pairs and biased convs, so
    auto measured both and says what it kept and why, as the report does."""
    api = sqlite_api
    r = api.client.post(
        "/jobs/new", data={"recipe": "int8_static", "csrf_token": api.csrf()},
        files={"model": ("conv.onnx", zoo["conv"].read_bytes()),
               "calibration": ("img.npz", zoo["conv_data"].read_bytes())},
        follow_redirects=False,
    )
    assert r.status_code == 303, r.text
    job_id = r.headers["location"].rsplit("/", 1)[1]
    assert api.run_queued() == ["succeeded"]
    report = api.client.get(f"/api/v1/jobs/{job_id}/report").json()
    page = api.client.get(f"/jobs/{job_id}").text
    for field, key in (("equalization", "equalization"), ("bias-correction", "bias_correction")):
        section = report[key]
        assert section["mode"] == "auto" and "compare" in section, section
        line = re.search(rf'<p data-field="{field}">(.*?)</p>', page, re.S)
        assert line is not None and f"{'On' if section['enabled'] else 'Off'} (auto): auto: " in line.group(1)
    assert report["equalization"]["pairs"] == 2 and report["equalization"]["check"]["passed"]


def test_static_job_with_4_bit_weights_shows_them_on_the_page_and_serves_the_4_bit_file(
        sqlite_api: Harness, zoo: dict[str, Path]) -> None:
    """Through the API: int8_static with four_bit_weights; the page's calibration card has a line saying how many
    layers' weights are 4-bit and which stayed 8-bit, and the layer table gives each layer's weight bits."""
    from tests.app.helpers import submit, upload_dataset, upload_model

    api = sqlite_api
    m = upload_model(api.client, zoo["conv"])
    d = upload_dataset(api.client, zoo["conv_data"])
    r = submit(api.client, model_id=m["id"], calibration_dataset_id=d["id"], recipe="int8_static",
               options={"four_bit_weights": True, "int8_most_sensitive": 1})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    assert api.run_queued() == ["succeeded"]
    report = api.client.get(f"/api/v1/jobs/{job_id}/report").json()
    section = report["four_bit_weights"]
    assert section["layers_4bit"] == 3 and len(section["layers_8bit"]) == 1
    page = api.client.get(f"/jobs/{job_id}").text
    line = re.search(r'<p data-field="four-bit-weights">(.*?)</p>', page, re.S)
    assert line is not None and line.group(1).startswith("<strong>4-bit weights:</strong> 3 layer(s) with 4-bit")
    assert f"1 kept in 8 bits, those whose 4-bit weights alone cost the output most on {section['samples']}" \
        in line.group(1)
    artifact = api.client.get(f"/api/v1/jobs/{job_id}/artifact").content
    assert len(artifact) == report["size"]["quantized_bytes"]
    import onnx

    model = onnx.load_from_string(artifact)
    assert sum(t.data_type == onnx.TensorProto.INT4 for t in model.graph.initializer) == 3
