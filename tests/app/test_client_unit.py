"""The client's pieces that need no server: where it finds server and key, event-stream parsing, ETags, the
summary table."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.client import LowbitClientError
from app.client.cli import Progress, default_output, summary_lines
from app.client.config import DEFAULT_SERVER, config_path, resolve
from app.client.core import etag_sha256, parse_sse
from app.examples import JOB_EXAMPLE, REPORT_EXAMPLE
from app.settings import Settings


def test_arguments_then_environment_then_config_file(tmp_path: Path) -> None:
    cfg = tmp_path / "client.toml"
    cfg.write_text('server = "https://lowbit.example.com/"\napi_key = "from-file"\n')
    env = {"LOWBIT_CLIENT_CONFIG": str(cfg)}
    assert resolve(env=env) == resolve(None, None, env)
    c = resolve(env=env)
    assert (c.server, c.api_key) == ("https://lowbit.example.com", "from-file")
    c = resolve(env={**env, "LOWBIT_SERVER": "10.0.0.5:8000", "LOWBIT_API_KEY": "from-env"})
    assert (c.server, c.api_key) == ("http://10.0.0.5:8000", "from-env")
    c = resolve("http://arg:1", "from-arg", env={**env, "LOWBIT_SERVER": "http://env:2"})
    assert (c.server, c.api_key) == ("http://arg:1", "from-arg")
    # No variables, no file: the local `lowbit serve`, no key.
    home = {"XDG_CONFIG_HOME": str(tmp_path / "nothing-here")}
    assert config_path(home) == tmp_path / "nothing-here" / "lowbit" / "client.toml"
    c = resolve(env=home)
    assert (c.server, c.api_key) == (DEFAULT_SERVER, None)
    # A config file named explicitly must exist and be valid.
    with pytest.raises(LowbitClientError) as e:
        resolve(env={"LOWBIT_CLIENT_CONFIG": str(tmp_path / "missing.toml")})
    assert e.value.code == "client_config_missing"
    cfg.write_text("server = [")
    with pytest.raises(LowbitClientError) as e:
        resolve(env=env)
    assert e.value.code == "invalid_client_config"
    with pytest.raises(LowbitClientError) as e:
        resolve("ftp://x", env=home)
    assert e.value.code == "invalid_server_url"


def test_client_variables_stay_out_of_the_server_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOWBIT_SERVER", "http://elsewhere:1")
    monkeypatch.setenv("LOWBIT_API_KEY", "k")
    monkeypatch.setenv("LOWBIT_CLIENT_CONFIG", "/nowhere.toml")
    s = Settings()
    assert not {"server", "api_key", "client_config"} & set(s.model_dump())


def test_event_stream_parsing() -> None:
    lines = ["retry: 2000", "", ": keep-alive", "", "event: stage", 'data: {"stage": "preparing"}', "",
             "event: job", 'data: {"id": "j",', 'data:  "status": "running"}', "", "data: plain", "", "event: end",
             'data: {"id": "j", "status": "succeeded"}', ""]
    got = [(e.event, e.data) for e in parse_sse(iter(lines))]
    assert got == [("heartbeat", None), ("stage", {"stage": "preparing"}), ("job", {"id": "j", "status": "running"}),
                   ("message", "plain"), ("end", {"id": "j", "status": "succeeded"})]


def test_etag() -> None:
    digest = "ab" * 32
    assert etag_sha256(f'"{digest}"') == digest == etag_sha256(f'W/"{digest.upper()}"')
    assert etag_sha256(None) is None and etag_sha256('"abc"') is None and etag_sha256("") is None


def test_summary_table_and_default_output() -> None:
    text = "\n".join(summary_lines(JOB_EXAMPLE, REPORT_EXAMPLE))
    assert f"job {JOB_EXAMPLE['id']} succeeded: int8_static in 37.6 s" in text
    assert "1.8 MB  ->  478.9 kB" in text and "3.85x smaller" in text
    assert "92.19 %  ->  90.62 %       -1.56 pt (-4.7 \u2026 0.0)" in text
    assert "1.912 ms  ->  0.744 ms      2.57x faster (2.4 \u2026 2.7)" in text
    assert "  output logits: cosine 0.999412 (0.9992 \u2026 0.9996), SQNR 29.31 dB (27.9 \u2026 30.8), top-1 " \
           "agreement 98.44 % (95.3 \u2026 100.0) (quantized vs original); a classification output (inferred)" in text
    assert "4 threads, 30 interleaved runs; intervals are 95%" in text
    assert "accuracy target label_accuracy max_drop 0.01: NOT met" in text
    assert "64 samples of the evaluation set" in text
    assert default_output(Path("/data/model.onnx"), "int8_static") == Path.cwd() / "model.int8.onnx"
    assert default_output(Path("net.onnx"), "int4_weight_only").name == "net.int4.onnx"
    assert default_output(Path("net.onnx"), "new_recipe").name == "net.new_recipe.onnx"


def test_summary_intervals_speed_noise_and_older_reports() -> None:
    """No factor for a speed-up inside the timing noise; a slow-down's interval as slow-down factors; every
    kind of output figure with its interval; a report from before intervals prints its figures alone."""
    import copy

    report = copy.deepcopy(REPORT_EXAMPLE)
    report["latency"].update(speedup=0.98, speedup_ci=[0.93, 1.08], speedup_measurable=False)
    report["accuracy"]["outputs"].append(
        {"name": "emb", "role": "embedding", "role_source": "declared", "cosine": 1.0, "cosine_ci": [1.0, 1.0],
         "sqnr_db": None, "identical": True, "neighbour_agreement": 1.0, "neighbour_agreement_ci": [1.0, 1.0]})
    report["accuracy"]["outputs"].append(
        {"name": "zeros", "cosine": 1.0, "sqnr_db": None, "identical": False,
         "sqnr_note": "undefined: the original output is all zeros", "sequence_agreement": 0.5,
         "sequence_agreement_ci": [0.25, 0.75], "ctc_sequence_agreement": 0.75})
    report["accuracy_target"].update(confidence=0.95, bound=0.875)
    text = "\n".join(summary_lines(JOB_EXAMPLE, report))
    assert "0.744 ms      no measurable speed-up (0.93 \u2026 1.08)" in text and "faster" not in text
    assert "  output emb: cosine 1.0 (1.0000 \u2026 1.0000), SQNR inf (bit-identical), neighbour agreement 100.00 % " \
           "(100.0 \u2026 100.0) (quantized vs original); an embedding output (declared)" in text
    assert "SQNR undefined: the original output is all zeros, sequence agreement 50.00 % (25.0 \u2026 75.0), CTC " \
           "sequence agreement 75.00 % (quantized vs original)" in text
    assert "NOT met (value 0.90625, 95% interval's lower end 0.875)" in text

    report["latency"].update(speedup=0.7, speedup_ci=[0.65, 0.75], speedup_measurable=True)
    assert "1.43x slower (1.3 \u2026 1.5)" in "\n".join(summary_lines(JOB_EXAMPLE, report))

    old = copy.deepcopy(REPORT_EXAMPLE)
    for k in ("speedup_ci", "speedup_measurable", "runs", "order"):
        del old["latency"][k]
    old["accuracy"]["labels"] = {k: v for k, v in old["accuracy"]["labels"].items() if not k.endswith("_ci")}
    old["accuracy"]["outputs"] = [{k: v for k, v in o.items() if not k.endswith("_ci") and not k.startswith("role")}
                                  for o in old["accuracy"]["outputs"]]
    lines = summary_lines(JOB_EXAMPLE, old)
    assert any(line.endswith("-1.56 pt") for line in lines) and any(line.endswith("2.57x faster") for line in lines)
    assert "\u2026" not in "\n".join(lines) and "intervals" not in "\n".join(lines)
    assert "  output logits: cosine 0.999412, SQNR 29.31 dB, top-1 agreement 98.44 % (quantized vs original)" in lines


def test_offline_quantize_prints_the_intervals(capsys: pytest.CaptureFixture[str]) -> None:
    from app.cli import print_figures
    from worker.engine.report import Report

    print_figures(Report.from_stored(REPORT_EXAMPLE).model_dump(mode="json", exclude_unset=True))
    out = capsys.readouterr().out
    assert "  label accuracy 92.19 % -> 90.62 %  -1.56 pt (-4.7 \u2026 0.0)" in out
    assert "  latency p50 1.912 ms -> 0.744 ms on CPUExecutionProvider: 2.57x faster (2.4 \u2026 2.7), 30 runs" in out
    assert "  output logits: cosine 0.999412 (0.9992 \u2026 0.9996)" in out


def test_progress_is_drawn_on_a_terminal_only() -> None:
    import io

    from app.client.core import Job

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    job = Job.from_json({**JOB_EXAMPLE, "status": "running", "stage": "calibrating", "progress": 34})
    for enabled, stream in ((None, io.StringIO()), (False, Tty())):
        p = Progress(enabled, stream)
        p.transfer("uploading model.onnx", 5 << 20, 10 << 20)
        p.job(job)
        p.note("hello")
        p.end()
        assert stream.getvalue() == ""
    tty = Tty()
    p = Progress(None, tty)
    p.transfer("uploading small.npz", 10, 100)  # too small to bother
    assert tty.getvalue() == ""
    p.transfer("uploading model.onnx", 10 << 20, 10 << 20)
    p.job(job)
    p.end()
    text = tty.getvalue()
    assert "\ruploading model.onnx" in text and "100.0 %  10.5 MB / 10.5 MB" in text
    assert f"\rjob {job.id[:8]}  calibrating" in text and " 34 %" in text and text.endswith("\n")
