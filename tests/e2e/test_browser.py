"""The pages in a real browser: Debian's chromium, headless, driven by Playwright, against a real
`lowbit serve` (embedded worker). A job is submitted through the upload form, its progress bar is watched
until the page turns into the report, the numbers on the page are compared with the report JSON, the
layer table is sorted, the artifact downloaded and checked against its ETag, and a hostile model's page
is loaded without anything executing. Full-page screenshots go to LOWBIT_SCREENSHOT_DIR (or a pytest
temp folder); the run's summary prints where."""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests import builders
from tests.conftest import REQUIRE, SCREENSHOTS
from tests.e2e.conftest import Proc, env_for, start_serve
from tests.reports import at, expected_verdict, shown_as

# The browser first: without chromium, skip before starting a server.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("browser")]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
JOB_PAGE = re.compile(r"/jobs/[0-9a-f-]{36}$")
WIDE = {"width": 1280, "height": 900}
NARROW = {"width": 390, "height": 844}


def _missing(why: str) -> None:
    msg = f"browser tests cannot run: {why}"
    if REQUIRE:
        pytest.fail(msg + " (LOWBIT_REQUIRE_SERVICES is set, so this is an error)")
    pytest.skip(msg)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        _missing(f"{CHROMIUM} is missing (apt-get install -y chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("the playwright package is not installed (pip install -e '.[dev]')")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@dataclass
class Served:
    proc: Proc
    client: httpx.Client
    base: str


# Per-file upload limit of the module's server: far above the test files, low enough to exceed cheaply.
UPLOAD_LIMIT = 40 * 2**20


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    data = tmp_path_factory.mktemp("browser") / "lowbit-data"
    proc, client = start_serve(data, data.parent / "serve.log",
                               env=env_for(data, LOWBIT_MAX_UPLOAD_BYTES=str(UPLOAD_LIMIT)))
    try:
        yield Served(proc, client, str(client.base_url).rstrip("/"))
    finally:
        client.close()
        proc.stop()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A text classifier big enough that its job runs for a few seconds (so its progress can be watched),
    with labelled calibration and evaluation data; a hostile model; a model whose job fails."""
    d = tmp_path_factory.mktemp("browser-files")
    clf = builders.tiny_transformer(d / "classifier.onnx", dim=256, seq=64, layers=4, classes=8)
    rng = np.random.default_rng(0)
    return {
        "clf": clf,
        "clf_data": builders.token_labels(d / "calibration.npz", clf, n=160),
        "clf_eval": builders.token_labels(d / "evaluation.npz", clf, n=48, seed=9),
        "hostile": builders.hostile_mlp(d / "hostile.onnx"),
        "hostile_data": builders.save_npz(d / "hostile.npz", x=rng.standard_normal((40, 16)).astype(np.float32)),
        "mismatched": builders.mismatched_mlp(d / "mismatched.onnx"),
        "mismatched_data": builders.save_npz(d / "features.npz", x=np.ones((20, 20), np.float32)),
    }


@pytest.fixture(scope="module")
def shots(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    env = os.environ.get("LOWBIT_SCREENSHOT_DIR")
    d = Path(env) if env else tmp_path_factory.mktemp("screenshots")
    d.mkdir(parents=True, exist_ok=True)
    request.config.stash[SCREENSHOTS] = d.resolve()
    print(f"\nscreenshots: {d.resolve()}")
    return d


@dataclass
class Tab:
    """A browser page that records every dialog (alert, confirm...), console error and uncaught exception;
    CSP violations show up as console errors."""

    page: Any
    dialogs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def attach(self) -> Tab:
        def on_dialog(d: Any) -> None:
            self.dialogs.append(d.message)
            d.dismiss()

        self.page.on("dialog", on_dialog)
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        return self

    def check_clean(self) -> None:
        assert self.dialogs == [], f"a dialog fired: {self.dialogs}"
        assert self.errors == [], f"console errors (CSP violations show up here): {self.errors}"


@pytest.fixture
def tabs(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport=WIDE, accept_downloads=True)
    opened: list[Tab] = []

    def new_tab() -> Tab:
        tab = Tab(context.new_page()).attach()
        tab.page.set_default_timeout(30_000)
        opened.append(tab)
        return tab

    yield new_tab
    try:
        for tab in opened:
            tab.check_clean()
    finally:
        context.close()


def fill_form(page: Any, model: Path | dict[str, Any], calibration: Path | dict[str, Any] | None = None,
              evaluation: Path | None = None, **selects: str) -> str:
    """Fill the upload form on / and submit it; returns the new job's id (the browser lands on its page)."""
    page.set_input_files("input[name=model]", model)
    if calibration is not None:
        page.set_input_files("input[name=calibration]", calibration)
    if evaluation is not None:
        page.set_input_files("input[name=eval]", evaluation)
    for name, value in selects.items():
        if page.locator(f"select[name={name}]").count():
            page.select_option(f"select[name={name}]", value)
        else:
            page.fill(f"input[name={name}]", value)
    page.click("form[action='/jobs/new'] button[type=submit]")
    page.wait_for_url(JOB_PAGE)
    return str(page.url.rsplit("/", 1)[-1])


def progress_state(page: Any) -> dict[str, Any] | None:
    """What the job page shows now; None while it is between documents (reloading into the report)."""
    from playwright.sync_api import Error

    try:
        return dict(page.evaluate("""() => {
            const q = (s) => document.querySelector(s);
            if (q('[data-field=verdict]') || q('#failure') || q('#cancelled')) return {done: true};
            const bar = q('progress[data-field=progress]');
            return {done: false, value: bar ? bar.value : null, status: q('.jobhead [data-field=status]').textContent,
                    stage: q('[data-field=stage-text]').textContent};
        }"""))
    except Error:
        return None


def wait_finished(page: Any, proc: Proc, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = progress_state(page)
        if state and state["done"]:
            return
        assert proc.alive(), proc.tail()
        time.sleep(0.2)
    pytest.fail(f"the job page did not show a finished job in {timeout}s:\n{proc.tail()}")


def column(page: Any, index: int) -> list[str]:
    return list(page.eval_on_selector_all(
        "#layers tbody tr",
        f"rows => rows.map(r => r.cells[{index}].dataset.value ?? r.cells[{index}].textContent.trim())"))


def test_submit_watch_progress_read_report_sort_and_download(served: Served, tabs: Any, files: dict[str, Path],
                                                            shots: Path) -> None:
    tab = tabs()
    page = tab.page
    page.goto(served.base + "/")
    assert page.title() == "lowbit: jobs"
    job_id = fill_form(page, files["clf"], files["clf_data"], files["clf_eval"], method="entropy", batch_size="1",
                       target_metric="label_accuracy", target_bound="max_drop", target_value="0.05")

    # The job list, open in a second tab, follows the job without reloading.
    lister = tabs()
    lister.page.goto(served.base + "/")
    lister.page.evaluate("window.__sameDocument = true")
    row = f'tr[data-job-id="{job_id}"]'
    assert lister.page.locator(row).count() == 1

    # Watch the progress bar move until the page turns into the report.
    seen: list[tuple[str, str, float]] = []
    shot = False
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        state = progress_state(page)
        if state is None:
            time.sleep(0.05)
            continue
        if state["done"]:
            break
        seen.append((state["status"], state["stage"], state["value"]))
        if not shot and state["status"] == "Running" and state["value"] >= 15:
            page.screenshot(path=str(shots / "02-running-job.png"), full_page=True)
            lister.page.wait_for_selector(f"{row}[data-status=running]")
            lister.page.screenshot(path=str(shots / "01-job-list-while-running.png"), full_page=True)
            shot = True
        assert served.proc.alive(), served.proc.tail()
        time.sleep(0.1)
    else:
        pytest.fail(f"no report after 120 s; seen {seen[-5:]}\n{served.proc.tail()}")
    running = [s for s in seen if s[0] == "Running"]
    assert shot and running, seen
    values = [s[2] for s in seen]
    assert values == sorted(values), "the progress bar went backwards"
    assert len({v for _, _, v in running}) >= 2, f"the bar never moved while the job ran: {running}"
    assert {s[1] for s in running} <= {"preparing", "calibrating", "quantizing", "validating", "reporting"}

    # The report: every exact number is the report JSON's, the verdict and cards agree with it.
    page.wait_for_selector("[data-field=verdict]")
    report = served.client.get(f"/api/v1/jobs/{job_id}/report").json()
    keyed = page.eval_on_selector_all("[data-key]", "els => els.map(e => [e.dataset.key, e.textContent])")
    assert len(keyed) >= 20 + len(report["layers"])
    for key, text in keyed:
        assert text == shown_as(at(report, key)), key
    verdict = page.inner_text("[data-field=verdict]")
    assert verdict.startswith(expected_verdict(report)), (verdict, expected_verdict(report))
    target = report["accuracy_target"]
    assert ("meets" if target["met"] else "misses") + " the accuracy target" in verdict
    size = report["size"]
    assert page.inner_text("#card-size .big") == \
        f"{size['original_bytes'] / 1e6:.1f} MB \u2192 {size['quantized_bytes'] / 1e6:.1f} MB"
    labels = report["accuracy"]["labels"]
    assert page.inner_text("#card-accuracy .big") == \
        f"{labels['original'] * 100:.1f} % \u2192 {labels['quantized'] * 100:.1f} %"
    assert page.inner_text("#card-target .big") == ("met" if target["met"] else "not met")
    assert page.inner_text(".jobhead [data-field=status]") == "Succeeded"

    # Four inline SVG charts, drawn by the server; the layer chart has a bar row per layer (up to 40).
    assert page.locator(".charts svg[role=img]").count() == 4
    shown_layers = min(40, len(report["layers"]))
    assert page.locator("svg.chart-layers g.row").count() == shown_layers
    worst = min(x["sqnr_db"] for x in report["layers"] if x["sqnr_db"] is not None)
    assert page.locator("svg.chart-layers g.row text.value").first.text_content().startswith(f"{worst:.1f} dB")
    page.screenshot(path=str(shots / "03-report.png"), full_page=True)

    # Sort the layer table by SQNR (missing values last), both ways, then by name, then back.
    n = len(report["layers"])
    assert column(page, 0) == [str(i) for i in range(1, n + 1)]
    page.click("#layers th:nth-child(5) button")
    assert page.get_attribute("#layers th:nth-child(5)", "aria-sort") == "ascending"
    sq = column(page, 4)
    measured = [float(v) for v in sq if v]
    assert measured == sorted(measured) and sq[len(measured):] == [""] * (n - len(measured))
    assert measured[0] == worst
    page.click("#layers th:nth-child(5) button")
    assert page.get_attribute("#layers th:nth-child(5)", "aria-sort") == "descending"
    measured = [float(v) for v in column(page, 4) if v]
    assert measured == sorted(measured, reverse=True)
    page.click("#layers th:nth-child(2) button")
    names = column(page, 1)
    assert names == sorted(names, key=str.lower) and sorted(names) == sorted(x["name"] for x in report["layers"])
    page.click("#layers th:nth-child(1) button")
    assert column(page, 0) == [str(i) for i in range(1, n + 1)]

    # Download the artifact: its sha256 is the ETag and the report's quantized_sha256.
    with page.expect_download() as info:
        page.click("[data-field=download]")
    download = info.value
    assert download.suggested_filename == "classifier.int8_static.onnx"
    digest = hashlib.sha256(Path(download.path()).read_bytes()).hexdigest()
    head = served.client.head(f"/api/v1/jobs/{job_id}/artifact")
    assert head.headers["etag"] == f'"{digest}"' == f'"{report["model"]["quantized_sha256"]}"'
    assert Path(download.path()).stat().st_size == size["quantized_bytes"]

    # A narrow screen: nothing wider than the viewport.
    page.set_viewport_size(NARROW)
    page.reload()
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    page.screenshot(path=str(shots / "04-report-narrow.png"), full_page=True)

    # The list's row went to 'Succeeded' with size and accuracy filled in, in the same document.
    lister.page.wait_for_selector(f"{row}[data-status=succeeded]", timeout=20_000)
    assert lister.page.evaluate("window.__sameDocument") is True
    assert lister.page.inner_text(f"{row} [data-field=status]") == "Succeeded"
    assert lister.page.inner_text(f"{row} [data-field=size]").startswith(f"{size['ratio']:.3f} (")
    assert "pt label accuracy" in lister.page.inner_text(f"{row} [data-field=accuracy]")


def test_failed_job_page(served: Served, tabs: Any, files: dict[str, Path], shots: Path) -> None:
    page = tabs().page
    page.goto(served.base + "/")
    job_id = fill_form(page, files["mismatched"], files["mismatched_data"], batch_size="4")
    wait_finished(page, served.proc)
    page.wait_for_selector("#failure")
    job = served.client.get(f"/api/v1/jobs/{job_id}").json()
    assert job["status"] == "failed"
    assert page.inner_text(".jobhead [data-field=status]") == "Failed"
    assert page.inner_text("[data-field=error-code]") == job["error"]["code"] == "model_run_failed"
    assert "dimension mismatch" in page.inner_text("[data-field=error-message]")
    assert page.locator("svg").count() == 0
    page.screenshot(path=str(shots / "05-failed-job.png"), full_page=True)


def test_cancel_from_the_page(served: Served, tabs: Any, files: dict[str, Path], shots: Path) -> None:
    page = tabs().page
    page.goto(served.base + "/")
    job_id = fill_form(page, files["clf"], files["clf_data"], batch_size="1")
    page.click("text=Cancel job")
    wait_finished(page, served.proc, timeout=60)
    page.wait_for_selector("#cancelled")
    assert served.client.get(f"/api/v1/jobs/{job_id}").json()["status"] == "cancelled"
    assert page.inner_text(".jobhead [data-field=status]") == "Cancelled"
    assert "No quantized model or report was kept" in page.inner_text("#cancelled")
    page.screenshot(path=str(shots / "06-cancelled-job.png"), full_page=True)


def test_hostile_model_executes_nothing(served: Served, tabs: Any, files: dict[str, Path], shots: Path) -> None:
    tab = tabs()
    page = tab.page
    page.goto(served.base + "/")
    hostile_name = f"{builders.IMG_TAG}.onnx"
    job_id = fill_form(page, {"name": hostile_name, "mimeType": "application/octet-stream",
                              "buffer": files["hostile"].read_bytes()},
                       {"name": f"{builders.SCRIPT_TAG}.npz", "mimeType": "application/octet-stream",
                        "buffer": files["hostile_data"].read_bytes()})
    wait_finished(page, served.proc)
    page.wait_for_selector("[data-field=verdict]")
    job = served.client.get(f"/api/v1/jobs/{job_id}").json()
    model = served.client.get(f"/api/v1/models/{job['model_id']}").json()
    assert "<img src=x onerror=alert(1)>" in model["filename"]
    for url in (f"/jobs/{job_id}", "/"):
        page.goto(served.base + url)
        page.wait_for_timeout(300)
        assert page.locator("img").count() == 0
        assert page.evaluate("document.querySelectorAll('[onerror], [onload], [onclick]').length") == 0
        srcs = page.eval_on_selector_all("script", "els => els.map(e => e.getAttribute('src'))")
        assert srcs and all(s and s.startswith("/static/") for s in srcs), srcs
        assert model["filename"] in page.inner_text("body")  # shown, as text
    page.goto(served.base + f"/jobs/{job_id}")
    assert page.inner_text("h1") == model["filename"]
    names = column(page, 1)
    assert builders.IMG_TAG in names and f"head{builders.SCRIPT_TAG}" in names
    assert builders.IMG_TAG in page.text_content("svg.chart-layers")
    page.screenshot(path=str(shots / "07-hostile-model.png"), full_page=True)
    assert tab.dialogs == []


def test_a_file_over_the_upload_limit_is_refused_before_sending(served: Served, tabs: Any,
                                                                tmp_path: Path, shots: Path) -> None:
    # The server would refuse it unread; a browser still sending often shows that as a dropped connection.
    big = tmp_path / "big.onnx"
    with open(big, "wb") as f:
        f.truncate(45 * 2**20)  # sparse: its size is all the form looks at
    page = tabs().page
    page.goto(served.base + "/")
    assert not page.is_visible("#size-error")  # hidden until a file is too large
    posts: list[str] = []
    page.on("request", lambda r: posts.append(r.url) if r.method == "POST" else None)
    page.set_input_files("input[name=model]", big)
    page.click("form[action='/jobs/new'] button[type=submit]")
    page.wait_for_selector("#size-error", state="visible")
    assert page.inner_text("[data-field=size-error]") == (
        "big.onnx is 45 MB; this server takes files of at most 40 MB (its LOWBIT_MAX_UPLOAD_BYTES). "
        "Choose a smaller file.")
    assert posts == [] and page.url.rstrip("/") == served.base
    page.screenshot(path=str(shots / "07b-upload-too-large.png"), full_page=True)


def test_job_list_shows_every_state(served: Served, tabs: Any, shots: Path) -> None:
    tab = tabs()
    page = tab.page
    page.goto(served.base + "/")
    statuses = page.eval_on_selector_all("tr[data-job-id] [data-field=status]", "els => els.map(e => e.textContent)")
    assert {"Succeeded", "Failed", "Cancelled"} <= set(statuses), statuses
    page.screenshot(path=str(shots / "08-job-list.png"), full_page=True)
    missing = page.goto(served.base + "/jobs/00000000-0000-0000-0000-000000000000")
    assert missing is not None and missing.status == 404 and page.inner_text("h1") == "Not found"
    assert tab.errors == ["Failed to load resource: the server responded with a status of 404 (Not Found)"]
    tab.errors.clear()
    page.goto(served.base + "/")
    page.set_viewport_size(NARROW)
    page.reload()
    page.screenshot(path=str(shots / "09-job-list-narrow.png"), full_page=True)


def test_keyed_server_sign_in_then_submit_and_watch_over_the_session_cookie(
        tabs: Any, files: dict[str, Path], tmp_path: Path, shots: Path) -> None:
    """A server that requires keys: the browser is sent to /login, signs in with a key (never in a URL), and
    the upload form, the live progress (EventSource and polling, over the cookie) and the download all work."""
    import subprocess

    from tests.e2e.conftest import env_for, lowbit_cmd

    data = tmp_path / "lowbit-data"
    env = env_for(data, LOWBIT_REQUIRE_KEYS="true")
    key = subprocess.run(lowbit_cmd("keys", "create", "--tenant", "acme"), env=env, capture_output=True, text=True,
                         timeout=60, check=True).stdout.strip()
    proc, client = start_serve(data, tmp_path / "serve.log", env=env)
    try:
        base = str(client.base_url).rstrip("/")
        tab = tabs()
        page = tab.page
        urls: list[str] = []
        page.on("request", lambda r: urls.append(r.url))
        page.goto(base + "/")
        assert "/login?next=" in page.url
        page.screenshot(path=str(shots / "10-sign-in.png"), full_page=True)
        page.fill("input[name=api_key]", key)
        page.click("button[type=submit]")
        page.wait_for_url(base + "/")
        assert "Sign out (acme)" in page.inner_text("header")
        job_id = fill_form(page, files["clf"], files["clf_data"], files["clf_eval"], batch_size="4")
        wait_finished(page, proc)
        page.wait_for_selector("[data-field=verdict]")
        job = client.get(f"/api/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {key}"}).json()
        assert job["status"] == "succeeded"
        with page.expect_download() as dl:
            page.click("[data-field=download]")
        saved = tmp_path / "artifact.onnx"
        dl.value.save_as(saved)
        auth = {"Authorization": f"Bearer {key}"}
        etag = client.head(f"/api/v1/jobs/{job_id}/artifact", headers=auth).headers["etag"]
        assert etag == f'"{hashlib.sha256(saved.read_bytes()).hexdigest()}"'
        assert not [u for u in urls if key in u or key.split("_", 2)[2] in u]
        # Signing out ends the session: the pages ask for a key again.
        page.click("text=Sign out")
        page.wait_for_url(re.compile(r"/login"))
        page.goto(base + f"/jobs/{job_id}")
        assert "/login?next=" in page.url
    finally:
        client.close()
        proc.stop()
