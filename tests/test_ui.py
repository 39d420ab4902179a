"""``gpt2exp ui``: a real ``mlflow server`` over a real experiment's store (parent run, two child runs, the
comparison report under ``report/`` on the parent), checked through the REST API and in headless Chromium (Debian's
``chromium``: the browser tests skip without it), and a clean stop on SIGINT. In a 1400 px wide window the
model-training view shows the run hierarchy, the logged comparison table and the plot without sideways scrolling."""

from __future__ import annotations

import html
import json
import os
import re
import selectors
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from gpt2exp.launch.plan import make_plan
from gpt2exp.launch.runner import run_plan
from gpt2exp.spec import validate_spec
from gpt2exp.tracking.browser import Browser, dump_dom, find_chromium, screenshot
from gpt2exp.tracking.ui import UIError, free_port, mlflow_server, port_is_free, serve_ui, ui_url

pytestmark = pytest.mark.slow

needs_chromium = pytest.mark.skipif(
    find_chromium() is None,
    reason="no chromium (Debian: apt-get install --no-install-recommends chromium, see .ci/install-browser; or set CHROMIUM)",
)

RAW = {
    "name": "uitest",
    "description": "Two attention variants on a Shakespeare sample",
    "data": {"path": "CORPUS"},
    "model": {"vocab_size": 50304, "block_size": 32, "n_layer": 1, "n_head": 2, "n_embd": 32},
    "train": {"max_steps": 4, "batch_size": 4, "eval_interval": 2, "eval_tokens": 128, "log_interval": 2},
    "variants": [{"name": "a", "set": {}}, {"name": "b", "set": {"model.n_kv_head": 1}}],
    "tracking": {"system_metrics": False},
}
CHILDREN = {"a/seed=1337", "b/seed=1337"}
REPORT = {"report/report.html", "report/report.md", "report/val_loss.png", "report/comparison.json"}
PLOT, TABLE = "report/val_loss.png", "report/comparison.json"
VIEWPORT = (1400, 900)
GENAI_ONLY = ("Evaluation", "Judges", "Sessions", "Prompts", "Observability")  # the GenAI view's tabs ("Traces": both views)


@pytest.fixture(scope="module")
def store(corpus_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny real experiment (two variants) in ``<out>/mlflow.db``; ``run_plan`` logs the comparison report
    (``report/report.html``, ``report.md``, ``val_loss.png``) on the parent run."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("ui")
    corpus = root / "corpus.txt"
    corpus.write_bytes(corpus_path.read_bytes()[:200_000])
    out = root / "out"
    raw = json.loads(json.dumps(RAW).replace('"CORPUS"', json.dumps(str(corpus))))
    results = run_plan(make_plan(validate_spec(raw), out, show_progress=False), "local", show_progress=False).runs
    assert set(results.status) == {"completed"}

    uri = f"sqlite:///{out.resolve() / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("uitest")
    parent = next(r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" not in r.data.tags)
    return {"out": out, "uri": uri, "experiment_id": exp.experiment_id, "parent_id": parent.info.run_id}


@pytest.fixture(scope="module")
def server(store: dict) -> str:
    with mlflow_server(store["uri"], store["out"] / "mlartifacts") as url:
        yield url


def get_json(url: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def test_rest_api_shows_parent_children_and_report(server: str, store: dict) -> None:
    runs = get_json(f"{server}/api/2.0/mlflow/runs/search", {"experiment_ids": [store["experiment_id"]]})["runs"]
    by_name = {r["info"]["run_name"]: r for r in runs}
    assert set(by_name) == {"uitest"} | CHILDREN
    parent = by_name["uitest"]
    assert parent["info"]["run_id"] == store["parent_id"]
    tags = lambda r: {t["key"]: t["value"] for t in r["data"].get("tags", [])}
    assert "mlflow.parentRunId" not in tags(parent)
    for name in CHILDREN:
        assert tags(by_name[name])["mlflow.parentRunId"] == store["parent_id"]
        assert by_name[name]["info"]["status"] == "FINISHED"
        assert any(m["key"] == "val_loss" for m in by_name[name]["data"]["metrics"])

    experiment = get_json(f"{server}/api/2.0/mlflow/experiments/get?experiment_id={store['experiment_id']}")["experiment"]
    experiment_tags = {t["key"]: t["value"] for t in experiment["tags"]}
    assert experiment_tags["mlflow.experimentKind"] == "custom_model_development"
    assert experiment_tags["mlflow.note.content"] == RAW["description"]

    q = urllib.parse.urlencode({"run_id": store["parent_id"], "path": "report"})
    files = get_json(f"{server}/api/2.0/mlflow/artifacts/list?{q}")["files"]
    assert {f["path"] for f in files} >= REPORT
    q = urllib.parse.urlencode({"run_uuid": store["parent_id"], "path": PLOT})
    with urllib.request.urlopen(f"{server}/get-artifact?{q}", timeout=30) as r:
        assert r.read(8) == b"\x89PNG\r\n\x1a\n"


def test_server_is_local_only_and_port_checked(server: str, store: dict) -> None:
    req = urllib.request.Request(
        f"{server}/api/2.0/mlflow/experiments/search?max_results=1", headers={"Host": "evil.example.com"}
    )
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code in (400, 403)
    port = int(server.rsplit(":", 1)[1])
    assert not port_is_free("127.0.0.1", port)
    with pytest.raises(UIError, match=f"port {port} on 127.0.0.1 is already in use"):
        serve_ui(store["uri"], None, port=port)


def test_bad_store_uris_fail_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(UIError, match="no MLflow store at"):
        serve_ui(f"sqlite:///{tmp_path / 'missing.db'}", None, port=free_port())
    with pytest.raises(UIError, match="already a tracking server"):
        serve_ui("http://127.0.0.1:5000", None, port=free_port())


def page_text(dom: str) -> str:
    """The visible text of a DOM dump, tags replaced by single spaces."""
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", dom)))


def page(server: str, experiment_id: str, path: str = "") -> str:
    """A UI page, in the "Model training" view (a fresh browser profile opens the GenAI view)."""
    return ui_url(server, experiment_id, path)


@needs_chromium
def test_browser_experiment_opens_in_the_training_view(server: str, store: dict) -> None:
    text = page_text(dump_dom(page(server, store["experiment_id"])))
    assert "Runs" in text and "Models" in text and RAW["description"] in text, text[:2000]
    shown = [tab for tab in GENAI_ONLY if re.search(rf"\b{tab}\b", text)]
    assert not shown, f"GenAI tabs on the experiment page: {shown}"


@needs_chromium
def test_browser_runs_page_shows_parent_of_three_runs(server: str, store: dict, tmp_path: Path) -> None:
    url = page(server, store["experiment_id"], "/runs")
    text = page_text(dump_dom(url))
    assert "uitest" in text and "3 matching runs" in text, text[:2000]  # the parent row (children collapsed under it)
    shot = screenshot(url, tmp_path / "runs.png")
    assert shot.stat().st_size > 20_000  # a rendered page, not a blank one


@needs_chromium
def test_browser_parent_and_child_run_pages_link_each_other(server: str, store: dict) -> None:
    dom = dump_dom(page(server, store["experiment_id"], f"/runs/{store['parent_id']}"))
    text = page_text(dom)
    assert "Child runs" in text, text[:2000]
    missing = [name for name in CHILDREN if name not in text]
    assert not missing, f"child runs not shown on the parent's page: {missing}"
    child_ids = set(re.findall(r'href="#/experiments/\d+/runs/([0-9a-f]{32})"', dom)) - {store["parent_id"]}
    assert len(child_ids) == 2, child_ids
    text = page_text(dump_dom(page(server, store["experiment_id"], f"/runs/{sorted(child_ids)[0]}")))
    assert "Parent run uitest" in text, text[:2000]


@needs_chromium
def test_browser_parent_run_shows_report_and_plot(server: str, store: dict, tmp_path: Path) -> None:
    url = page(server, store["experiment_id"], f"/runs/{store['parent_id']}/artifacts/{PLOT}")
    dom = dump_dom(url)
    assert "report" in page_text(dom) and "spec.yaml" in page_text(dom)  # the artifact tree
    assert re.search(rf'<img alt="{re.escape(PLOT)}" src="blob:', dom), "the PNG preview was not rendered"
    assert screenshot(url, tmp_path / "plot.png").stat().st_size > 20_000  # a rendered page, not a blank one

    url = page(server, store["experiment_id"], f"/runs/{store['parent_id']}/artifacts/report/report.html")
    dom = dump_dom(url)  # the HTML report is shown in a sandboxed iframe (its content is not in the dump)
    assert re.search(r'<iframe src="blob:[^"]+" sandbox="[^"]*" class="mlflow-html-iframe"', dom), (
        "the HTML report was not rendered"
    )
    assert screenshot(url, tmp_path / "report.png").stat().st_size > 20_000


# JavaScript run in the page: the elements that scroll sideways (form fields aside), and whether an element lies
# within the window's width
SIDEWAYS = """[...document.querySelectorAll('*')].filter(e => !['INPUT', 'TEXTAREA'].includes(e.tagName)
    && e.scrollWidth > e.clientWidth + 1 && ['auto', 'scroll'].includes(getComputedStyle(e).overflowX))
    .map(e => `${e.tagName}.${e.className} ${e.scrollWidth} > ${e.clientWidth}`)
    .concat(document.documentElement.scrollWidth > innerWidth ? ['the page'] : [])"""
INSIDE = "(e => { const r = e.getBoundingClientRect(); return r.width > 0 && r.left >= 0 && r.right <= innerWidth; })"


@pytest.fixture(scope="module")
def browser(server: str) -> Browser:
    """One 1400x900 tab; the MLflow assistant panel, which MLflow opens once in a new browser, stays closed as a
    user closes it (it would take a third of the width)."""
    with Browser(VIEWPORT) as tab:
        tab.goto(f"{server}/health", "document.body.innerText.length > 0")  # the UI's origin, without the app
        tab.evaluate("localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true')")
        yield tab


def show(browser: Browser, url: str, until: str) -> None:
    browser.goto("about:blank")  # a full load: a change of the URL's #fragment alone keeps the page as it was
    browser.goto(url, until)


@needs_chromium
def test_browser_run_hierarchy_fits_1400_px(browser: Browser, server: str, store: dict, tmp_path: Path) -> None:
    row = "[...document.querySelectorAll('[role=row]')].find(r => r.innerText.includes('uitest'))"
    show(browser, page(server, store["experiment_id"], "/runs"), row)
    browser.evaluate(f"{row}.querySelector('button').click()")  # expand the parent: its children under it
    names = f"[...document.querySelectorAll('[role=row] a')].filter(a => {sorted({'uitest'} | CHILDREN)}.includes(a.innerText.trim()))"
    deadline = time.monotonic() + 60
    while browser.evaluate(f"{names}.length") < 3 and time.monotonic() < deadline:
        time.sleep(0.25)
    browser.screenshot(tmp_path / "hierarchy.png")
    assert browser.evaluate(f"{names}.filter({INSIDE}).map(a => a.innerText.trim()).sort()") == sorted({"uitest"} | CHILDREN)
    assert browser.evaluate(SIDEWAYS) == []


@needs_chromium
def test_browser_logged_table_fits_1400_px(browser: Browser, server: str, store: dict, tmp_path: Path) -> None:
    headers = "[...document.querySelectorAll('[role=columnheader], th')]"
    show(browser, page(server, store["experiment_id"], f"/runs/{store['parent_id']}/artifacts/{TABLE}"), f"{headers}.length")
    browser.screenshot(tmp_path / "table.png")
    shown = browser.evaluate(f"{headers}.filter({INSIDE}).map(h => h.innerText.trim())")
    assert shown == ["variant", "final val_loss", "Δ val_loss vs a", "verdict"], shown  # one seed: no p Holm
    cells = browser.evaluate("[...document.querySelectorAll('[role=cell], td')].map(c => c.innerText.trim())")
    assert {"a", "b", "baseline", "too few seeds"} <= set(cells), cells
    assert browser.evaluate(SIDEWAYS) == []


@needs_chromium
def test_browser_plot_fits_1400_px(browser: Browser, server: str, store: dict, tmp_path: Path) -> None:
    image = f'document.querySelector(\'img[alt="{PLOT}"][src^="blob:"]\')'
    show(browser, page(server, store["experiment_id"], f"/runs/{store['parent_id']}/artifacts/{PLOT}"), f"{image}?.complete")
    browser.screenshot(tmp_path / "plot.png")
    assert browser.evaluate(f"{image}.naturalWidth") > 1000 and browser.evaluate(f"{INSIDE}({image})")
    assert browser.evaluate(f"{image}.getBoundingClientRect().top") < VIEWPORT[1] / 2  # no scrolling down to it either
    assert browser.evaluate(SIDEWAYS) == []


def _read_line(proc: subprocess.Popen, prefix: str, timeout: float) -> str:
    """The first stdout line starting with ``prefix`` (fails with what was printed if none comes)."""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sel.select(timeout=0.5):
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            if line.startswith(prefix):
                return line
    proc.kill()
    raise AssertionError(f"no {prefix!r} line within {timeout} s; output: {''.join(seen)}{proc.stderr.read()}")


def test_serve_ui_stops_cleanly_on_sigint(store: dict) -> None:
    import psutil

    port = free_port()
    code = (
        "import sys; from pathlib import Path; from gpt2exp.tracking.ui import serve_ui; "
        f"sys.exit(serve_ui({store['uri']!r}, Path({str(store['out'] / 'mlartifacts')!r}), port={port}))"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = _read_line(proc, "MLflow UI: ", 120)
        assert f"http://127.0.0.1:{port}" in line
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as r:
            assert r.status == 200
        server_procs = psutil.Process(proc.pid).children(recursive=True)
        assert server_procs, "no server process under serve_ui"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=15) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    time.sleep(0.5)
    left = [p for p in server_procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, f"server processes left: {[(p.pid, p.cmdline()) for p in left]}"
    assert port_is_free("127.0.0.1", port)


def test_cli_ui_without_store_fails_in_one_line(tmp_path: Path) -> None:
    from gpt2exp.cli import app

    if "ui" not in {c.name or c.callback.__name__ for c in app.registered_commands}:
        pytest.skip("`gpt2exp ui` is not wired into gpt2exp/cli/ yet")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    r = subprocess.run(
        [sys.executable, "-m", "gpt2exp.cli", "ui", "--output", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert r.returncode == 1, r.stderr
    assert "no MLflow store at" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
