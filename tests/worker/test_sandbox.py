"""The sandbox with real faults: a child that segfaults, balloons, spins, sleeps or is killed ends as a
specific EngineError, and the calling process carries on."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.settings import Settings
from tests import builders
from tests.worker import faults
from worker import sandbox
from worker.engine.config import QuantizeConfig, parse_options
from worker.engine.errors import EngineError, JobCancelled
from worker.runner import run_engine

F = "tests.worker.faults"


def _fails(target: str, payload: Any, limits: sandbox.Limits) -> EngineError:
    with pytest.raises(EngineError) as info:
        sandbox.run(f"{F}:{target}", payload, limits)
    return info.value


def test_result_and_events_come_back() -> None:
    seen: list[Any] = []
    assert sandbox.run(f"{F}:echo", 21, sandbox.Limits(memory_mb=2048, cpu_s=30, timeout_s=30), seen.append) == \
        {"doubled": 42}
    assert seen[0] == ("calibrating", 0.0) and seen[-1] == ("calibrating", 1.0)


def test_segfault_is_engine_crashed() -> None:
    err = _fails("segfault", None, sandbox.Limits())
    assert err.code == "engine_crashed" and "SIGSEGV" in err.message


def test_memory_past_the_limit_is_out_of_memory() -> None:
    err = _fails("balloon", None, sandbox.Limits(memory_mb=1024))
    assert err.code == "out_of_memory" and "1024 MB" in err.message


def test_cpu_past_the_limit_is_cpu_time_exceeded() -> None:
    started = time.monotonic()
    err = _fails("spin", None, sandbox.Limits(cpu_s=1))
    assert err.code == "cpu_time_exceeded" and "LOWBIT_JOB_CPU_LIMIT_S" in err.message
    assert time.monotonic() - started < 20


def test_wall_clock_past_the_timeout_is_job_timeout() -> None:
    started = time.monotonic()
    err = _fails("sleep", 60, sandbox.Limits(timeout_s=1.5))
    assert err.code == "job_timeout"
    assert time.monotonic() - started < 10


def test_engine_errors_and_bugs_cross_over() -> None:
    err = _fails("refuse", None, sandbox.Limits())
    assert (err.code, err.message) == ("invalid_model", "this model is not one we can read")
    with pytest.raises(sandbox.ChildFailed) as info:
        sandbox.run(f"{F}:bug", None, sandbox.Limits())
    assert info.value.type_name == "KeyError" and "missing" in info.value.trace


def test_an_exception_from_tick_kills_the_child_at_once() -> None:
    pids: list[int] = []

    def tick() -> None:
        if pids:
            raise JobCancelled()

    started = time.monotonic()
    with pytest.raises(JobCancelled):
        sandbox.run(f"{F}:sleep", 60, sandbox.Limits(), tick=tick, on_start=pids.append)
    assert time.monotonic() - started < 5
    with pytest.raises(ProcessLookupError):
        os.kill(pids[0], 0)


def test_a_child_killed_from_outside_is_engine_crashed() -> None:
    def kill(event: Any) -> None:
        os.kill(int(event[1]), signal.SIGKILL)

    with pytest.raises(EngineError) as info:
        sandbox.run(f"{F}:pid", 60, sandbox.Limits(), on_event=kill)
    assert info.value.code == "engine_crashed" and "SIGKILL" in info.value.message


def test_a_spare_child_waits_preloaded_for_the_next_run() -> None:
    first: list[int] = []
    second: list[int] = []
    try:
        sandbox.run(f"{F}:echo", 1, sandbox.Limits(), on_start=first.append, preload=("numpy",), spare=True)
        spare = sandbox.spare_pids()[("numpy",)]
        deadline = time.monotonic() + 20  # it names itself as soon as it has started
        while Path(f"/proc/{spare}/comm").read_text().strip() != "lowbit-spare":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert sandbox.run(f"{F}:echo", 2, sandbox.Limits(), on_start=second.append, preload=("numpy",),
                           spare=True) == {"doubled": 4}
        assert second == [spare] != first
    finally:
        sandbox.drop_spares()
    assert not sandbox.spare_pids()


def test_the_engine_preload_imports_the_quantizer_the_way_the_engine_does() -> None:
    # "module:function" entries are called after the import: ONNX Runtime's quantizer without onnx.reference.
    from worker.runner import ENGINE_PRELOAD

    held = sandbox.run(f"{F}:loaded", ["onnxruntime.quantization", "onnx.reference"], sandbox.Limits(),
                       preload=ENGINE_PRELOAD)
    assert held == {"onnxruntime.quantization": True, "onnx.reference": False}


def test_the_child_gets_no_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOWBIT_DATABASE_URL", "postgresql://secret")
    assert "LOWBIT_DATABASE_URL" not in sandbox.child_env()
    assert "PATH" in sandbox.child_env()


def _cfg(model: Path, data: Path, out: Path, recipe: str = "int8_dynamic") -> QuantizeConfig:
    return QuantizeConfig(model_path=model, output_path=out, recipe=recipe,
                          options=parse_options(recipe, {"latency_runs": 2}), calibration_path=data,
                          work_dir=out.parent / "work", threads=1, device="cpu")


def test_run_engine_fails_a_ballooning_model_and_runs_the_next(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, job_memory_limit_mb=2048, job_cpu_limit_s=60, job_timeout_s=120)
    bad = faults.balloon_model(tmp_path / "balloon.onnx", gigabytes=40)
    data = builders.save_npz(tmp_path / "x.npz", x=np.ones((16, 4), np.float32))
    progress: list[tuple[str, float]] = []
    with pytest.raises(EngineError) as info:
        run_engine(_cfg(bad, data, tmp_path / "bad.onnx"), lambda s, f: progress.append((s, f)), settings)
    assert info.value.code == "out_of_memory", info.value
    mlp = builders.mlp(tmp_path / "mlp.onnx")
    good = builders.mlp_data(tmp_path / "mlp.npz", n=24, model=mlp)
    result = run_engine(_cfg(mlp, good, tmp_path / "good.onnx"), lambda s, f: progress.append((s, f)), settings)
    assert result.artifact_path.is_file() and result.report["size"]["quantized_bytes"] > 0
    assert ("validating", 0.0) in progress or any(s == "validating" for s, _ in progress)


def test_run_engine_stops_an_endless_loop_at_the_cpu_limit(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, job_memory_limit_mb=0, job_cpu_limit_s=3, job_timeout_s=60)
    model = faults.endless_loop_model(tmp_path / "loop.onnx")
    data = builders.save_npz(tmp_path / "x.npz", x=np.ones((16, 4), np.float32))
    with pytest.raises(EngineError) as info:
        run_engine(_cfg(model, data, tmp_path / "loop.int8.onnx"), lambda s, f: None, settings)
    assert info.value.code == "cpu_time_exceeded", info.value


def test_run_engine_polls_progress_for_cancellation(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, job_memory_limit_mb=0, job_cpu_limit_s=0, job_timeout_s=60)
    model = faults.endless_loop_model(tmp_path / "loop.onnx")
    data = builders.save_npz(tmp_path / "x.npz", x=np.ones((16, 4), np.float32))
    calls: list[float] = []

    def progress(stage: str, fraction: float) -> None:
        calls.append(time.monotonic())
        if len(calls) >= 4:  # the engine is stuck in the loop: only the polls call us now
            raise JobCancelled()

    started = time.monotonic()
    with pytest.raises(JobCancelled):
        run_engine(_cfg(model, data, tmp_path / "loop.int8.onnx"), progress, settings)
    assert time.monotonic() - started < 20


def test_a_subverted_child_cannot_run_code_in_the_worker(tmp_path: Path) -> None:
    """What comes back from the child is JSON, never unpickled: a pickle payload sent up the pipe is refused."""
    canary = tmp_path / "canary"
    err = _fails("forge", str(canary), sandbox.Limits(timeout_s=20))
    assert err.code == "engine_crashed" and "not a result" in err.message
    assert not canary.exists()
    # The payload is live: unpickled, it would have made the file.
    import pickle

    from tests.worker.faults import _Canary

    pickle.loads(pickle.dumps(_Canary(str(tmp_path / "proof"))))
    assert (tmp_path / "proof").exists()


def test_the_engines_temporary_files_go_in_the_work_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # ONNX Runtime's quantizer writes model copies to the temp folder; in the work folder, the worker's
    # cleanup removes them even after a child killed at a limit.
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "system-tmp"))
    mlp = builders.mlp(tmp_path / "mlp.onnx")
    data = builders.mlp_data(tmp_path / "mlp.npz", n=24, model=mlp)
    cfg = _cfg(mlp, data, tmp_path / "out" / "q.onnx", recipe="int8_static")
    seen: set[str] = set()
    result = sandbox.quantize(cfg, lambda event: seen.add(tempfile.gettempdir()))
    assert Path(result["artifact_path"]).is_file()
    assert seen == {str(tmp_path / "out" / "work" / "tmp")}
    assert os.environ["TMPDIR"] == str(tmp_path / "out" / "work" / "tmp")


def test_the_child_runs_in_the_work_folder_with_the_parents_paths(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # A relative path in the payload names the file the worker means (its data directory may be relative), even
    # though the child works elsewhere: the parent makes it absolute before sending.
    monkeypatch.chdir(tmp_path)
    Path("model.txt").write_text("the model")
    work = tmp_path / "job" / "work-1"
    out = sandbox.run(f"{F}:where", faults.Job(Path("model.txt"), Path("job/work-1")), sandbox.Limits(timeout_s=30))
    assert out["cwd"] == out["tmp"] == out["tmpdir_env"] == str(work / "tmp")
    assert (out["source"], out["source_path"]) == ("the model", str(tmp_path / "model.txt"))
    # Without a work folder: a private temporary one, removed when the child is done.
    out = sandbox.run(f"{F}:where", faults.Job(tmp_path / "model.txt"), sandbox.Limits(timeout_s=30))
    assert out["cwd"] == out["tmp"] and Path(out["cwd"]).name.startswith("lowbit-job-")
    assert not Path(out["cwd"]).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job", "model.txt"]


@pytest.fixture(scope="module")
def unmerged(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("unmerged")
    return {"model": builders.unmerged_dims_mlp(d / "model.onnx"), "data": builders.unmerged_dims_data(d / "data.npz")}


@pytest.fixture
def empty_cwd_and_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, Path]]:
    """An empty working directory, and an empty folder standing in for the system temp folder (TMPDIR)."""
    import tempfile

    cwd, systmp = tmp_path / "cwd", tmp_path / "systmp"
    cwd.mkdir()
    systmp.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("TMPDIR", str(systmp))
    monkeypatch.setattr(tempfile, "tempdir", None)
    sandbox.drop_spares()  # children started before would keep the real TMPDIR
    yield cwd, systmp
    sandbox.drop_spares()


@pytest.mark.parametrize("recipe, options", [
    ("int8_static", {}),
    ("int8_dynamic", {}),
    ("int4_weight_only", {"algorithm": "rtn"}),
    ("int4_weight_only", {"algorithm": "clip_search"}),
    ("fp16", {}),
])
def test_a_job_writes_nothing_outside_its_work_folder(recipe: str, options: dict[str, Any], unmerged: dict[str, Path],
                                                      empty_cwd_and_tmp: tuple[Path, Path], tmp_path: Path) -> None:
    # The model's two inputs name their batch axes differently, which made ONNX Runtime's symbolic shape inference
    # stop and save sym_shape_infer_temp.onnx + <uuid1>.data (512 kB of weights) in the working directory: the
    # worker's, where 51 of them (3.2 GB) once piled up. They must land in the job's work folder, which the
    # worker removes after every attempt. Pre-processing now skips symbolic inference for this model (ONNX's own
    # shapes it: worker/engine/normalize.py shapes_complete) and runs it, when needed, in its prep folder;
    # tests/worker/engine/test_normalize.py forces the early stop and finds the files there.
    cwd, systmp = empty_cwd_and_tmp
    work = tmp_path / "job" / "work-1"
    cfg = QuantizeConfig(model_path=Path(os.path.relpath(unmerged["model"])), output_path=tmp_path / "job" / "q.onnx",
                         recipe=recipe, options=parse_options(recipe, {"latency_runs": 2, **options}),
                         calibration_path=unmerged["data"], work_dir=work, threads=1, device="cpu")
    settings = Settings(data_dir=tmp_path / "data", job_memory_limit_mb=0, job_cpu_limit_s=0, job_timeout_s=300)
    result = run_engine(cfg, lambda stage, fraction: None, settings)
    assert result.artifact_path.is_file()
    assert list(cwd.iterdir()) == [] and list(systmp.iterdir()) == []
    assert (work / "tmp").is_dir()  # the engine child's working and temp folder was the job's


def test_a_pt2_job_writes_nothing_outside_its_work_folder(pt2_zoo: dict[str, Path],
                                                          empty_cwd_and_tmp: tuple[Path, Path], tmp_path: Path) -> None:
    # qat_int8: the export and the training run in PyTorch child processes of the sandbox child.
    cwd, systmp = empty_cwd_and_tmp
    cfg = QuantizeConfig(model_path=pt2_zoo["outlier"], output_path=tmp_path / "job" / "q.onnx", recipe="qat_int8",
                         options=parse_options("qat_int8", {"latency_runs": 2, "steps": 3}),
                         calibration_path=Path(os.path.relpath(pt2_zoo["outlier_cal"])),
                         work_dir=tmp_path / "job" / "work-1", threads=1, device="cpu")
    settings = Settings(data_dir=tmp_path / "data", job_memory_limit_mb=0, job_cpu_limit_s=0, job_timeout_s=600)
    result = run_engine(cfg, lambda stage, fraction: None, settings)
    assert result.artifact_path.is_file() and result.report["recipe"] == "qat_int8"
    assert list(cwd.iterdir()) == [] and list(systmp.iterdir()) == []


def test_there_is_one_child_runner() -> None:
    """Engine children and .pt2 children start, limit and kill the same way (issue #16): no worker module but
    worker.engine.subprocess_runner starts a Python child, keeps an environment allow-list, sets limits or
    kills a process group."""
    root = Path(__file__).resolve().parents[2] / "worker"
    marks = ("sys.executable", "start_new_session", "killpg", "setrlimit", '"LD_LIBRARY_PATH"', "PDEATHSIG")
    found = {f"{p.relative_to(root)}: {m}" for p in root.rglob("*.py") for m in marks if m in p.read_text()}
    others = {f for f in found if not f.startswith("engine/subprocess_runner.py")}
    # tasks.py asks for SIGTERM when `lowbit serve` dies (the worker itself, not a child it starts).
    assert others == {"tasks.py: PDEATHSIG"}, others
    assert "engine/subprocess_runner.py: start_new_session" in found


def test_pt2_children_run_through_the_shared_runner(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from worker.engine import pt2, subprocess_runner

    calls: list[tuple[str, subprocess_runner.Limits, dict[str, Any]]] = []

    def fake_run(target: str, payload: Any, limits: subprocess_runner.Limits, *args: Any, **kwargs: Any) -> Any:
        calls.append((target, limits, kwargs))
        return {"ok": True}

    monkeypatch.setattr(subprocess_runner, "run", fake_run)
    assert pt2.run_child("inspect", {"model": "m.pt2"}, tmp_path, 5.0, threads=3) == {"ok": True}
    [(target, limits, kwargs)] = calls
    assert target == "worker.engine.pt2_child:inspect" and limits.timeout_s == 5.0
    spawn = kwargs["spawn"]
    assert dict(spawn.env) == {"OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "3"}  # no environment of its own
    assert spawn.log == tmp_path / "inspect.log" and kwargs["work_dir"] == tmp_path
    assert kwargs["timed_out"](limits).code == "torch_timeout"


def test_a_child_that_dies_is_explained_by_its_log(tmp_path: Path) -> None:
    from worker.engine import pt2, subprocess_runner

    log = tmp_path / "child.log"
    seen: list[subprocess_runner.Ended] = []

    def ended(end: subprocess_runner.Ended) -> EngineError:
        seen.append(end)
        return EngineError("mine", end.log_tail)

    with pytest.raises(EngineError) as info:
        subprocess_runner.run(f"{F}:last_words_then_segfault", None, sandbox.Limits(timeout_s=30),
                              spawn=subprocess_runner.Spawn(log=log), ended=ended)
    assert info.value.code == "mine" and "last words before the crash" in info.value.message
    assert seen[0].returncode == -signal.SIGSEGV
    # A real .pt2 child, on a file torch cannot load: torch's words, through the same runner.
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(b"not a zip")
    with pytest.raises(EngineError) as info:
        pt2.run_child("inspect", {"model": str(bad)}, tmp_path / "work", 120.0)
    assert info.value.code == "invalid_model" and "PyTorch could not load" in info.value.message


def test_a_pt2_child_past_its_time_is_torch_timeout(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from worker.engine import pt2

    with pytest.raises(EngineError) as info:
        pt2.run_child("inspect", {"model": str(tmp_path / "none.pt2")}, tmp_path, 0.5)
    assert info.value.code == "torch_timeout" and "within 0 s" in info.value.message


def test_a_grandchild_dies_with_the_child_that_started_it() -> None:
    # A .pt2 child started inside a job's engine child has its own session, so killing the engine child's group
    # misses it: its parent-death signal must end it.
    grandchildren: list[int] = []

    def on_event(event: Any) -> None:
        if event[0] == "grandchild":
            grandchildren.append(int(event[1]))
            raise JobCancelled()

    with pytest.raises(JobCancelled):
        sandbox.run(f"{F}:nest", None, sandbox.Limits(timeout_s=60), on_event=on_event)
    [pid] = grandchildren
    deadline = time.monotonic() + 10
    while _alive(pid):
        assert time.monotonic() < deadline, "the grandchild outlived its parent"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting to be reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
