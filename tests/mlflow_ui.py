"""MLflow's web UI over a reid-ray store, driven by a headless browser: for tests and the docs screenshot.

    python -m tests.mlflow_ui --mlflow-uri sqlite:///mlflow.db --experiment "synth-a->synth-b" --out docs/mlflow-ui.png

starts `mlflow server` on 127.0.0.1 (a free port, its own process group, stopped on exit), opens the
experiment's runs in headless Chromium (Playwright driving the system browser: `apt-get install chromium`,
or `REID_RAY_CHROMIUM=/path/to/chrome`; never a downloaded one), shows the newest sweep (`--sweep NAME`
for another) with its trials listed under its parent run, and saves the chart view of `target_mAP`
across the trials, full width, as a PNG. An http(s) tracking URI is used as it is, no server started.

MLflow 3.17's UI has a GenAI / Model training switch (the browser's localStorage, `mlflow.workflowType`,
GenAI by default) that decides how an experiment opens, whatever the experiment's `mlflow.experimentKind`
tag says: a fresh browser opens /#/experiments/<id> on the GenAI traces overview. The runs page is opened
here with `workflowType=machine_learning` in its URL, the link the switch itself writes.

Everything the helpers rely on in the page is visible text or an accessible role (the "Columns" button, the
"Search columns" and "Search metric charts" boxes, run names as links, chart titles as headings), plus
three of MLflow's test ids (chart cards, their grid and resize handles), ag-grid's `row-id` (the run id)
and plotly's trace classes where no text names the element.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from reid_ray import ReidRayError, atomic_path

MATCHING_RUNS = re.compile(r"\d+ matching runs?")
# the assistant panel opens itself on a browser's first visit and would cover a third of the page
_QUIET_ASSISTANT = """try {
  localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');
  localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');
} catch (e) {}"""


# --------------------------------------------------------------------------- the server

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _exited(proc: subprocess.Popen) -> bool:
    """Whether the leader has exited, without reaping it: while it is a zombie its pid, the group's id,
    cannot be reused, so signalling the group never reaches another process."""
    return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _stop_group(proc: subprocess.Popen, term_wait_s: float = 10.0, kill_wait_s: float = 10.0) -> None:
    """Stop the server's own process group (the mlflow CLI, uvicorn): SIGTERM, SIGKILL after `term_wait_s`;
    once the leader is gone, SIGKILL to what is left of the group; then the leader is reaped."""
    if proc.returncode is None:
        for sig, wait_s in ((signal.SIGTERM, term_wait_s), (signal.SIGKILL, kill_wait_s)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            deadline = time.monotonic() + wait_s
            while not _exited(proc) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _exited(proc):
                break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # a worker that outlived the leader
    try:
        proc.wait(timeout=1)
    except subprocess.TimeoutExpired:
        print(f"reid-ray: warning: mlflow server (pid {proc.pid}) did not stop", file=sys.stderr)


@contextlib.contextmanager
def mlflow_server(store_uri: str, *, port: int | None = None, start_timeout_s: float = 120.0) -> Iterator[str]:
    """`mlflow server --backend-store-uri <store> --host 127.0.0.1 --port <free port>` for the block; yields its
    URL once /health answers. It runs in a temporary folder (whatever it writes stays there), in its own
    process group, which alone is stopped on exit (SIGTERM, then SIGKILL: bounded waits). One worker and no
    job runner: the UI needs neither more."""
    from reid_ray.tracking import resolve_uri

    store_uri = resolve_uri(store_uri)  # the server runs elsewhere: a relative sqlite path is pinned here
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow_cli)] if mlflow_cli.is_file() else [sys.executable, "-m", "mlflow"]
    cmd += ["server", "--backend-store-uri", store_uri, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
           "DO_NOT_TRACK": "true"}
    with tempfile.TemporaryDirectory(prefix="reid-ray-mlflow-ui-") as work:
        log_path = Path(work) / "server.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + start_timeout_s
            while True:
                if proc.poll() is not None:
                    raise ReidRayError(f"mlflow server over {store_uri} exited with code {proc.returncode} before "
                                       f"answering:\n{_tail(log_path)}")
                try:
                    with urllib.request.urlopen(url + "/health", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise ReidRayError(f"mlflow server over {store_uri} did not answer {url}/health within "
                                       f"{start_timeout_s:.0f} s:\n{_tail(log_path)}")
                time.sleep(0.5)
            yield url
        finally:
            _stop_group(proc)


def _api(base_url: str, path: str, body: dict | None = None, params: dict | None = None) -> dict:
    url = f"{base_url}/api/2.0/mlflow/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read() or b"{}")


def experiment_id(base_url: str, experiment: str) -> str:
    """The id of the experiment named `experiment` on the server (a clear error naming the ones it has)."""
    try:
        return _api(base_url, "experiments/get-by-name", params={"experiment_name": experiment})["experiment"][
            "experiment_id"]
    except urllib.error.HTTPError as e:
        if e.code != 404:
            raise
    names = [x["name"] for x in _api(base_url, "experiments/search", {"max_results": 1000}).get("experiments", [])]
    raise ReidRayError(f"no MLflow experiment {experiment!r} in this store; it has: {', '.join(names) or 'none'}")


def sweep_parents(base_url: str, exp_id: str) -> list[str]:
    """The run names of the experiment's sweep parents (tag sweep_parent=true), newest first."""
    runs = _api(base_url, "runs/search", {"experiment_ids": [exp_id], "filter": "tags.sweep_parent = 'true'",
                                          "order_by": ["attributes.start_time DESC"], "max_results": 100})
    return [r["info"]["run_name"] for r in runs.get("runs", [])]


# --------------------------------------------------------------------------- the browser

def chromium_path() -> str | None:
    """The system Chromium Playwright drives: $REID_RAY_CHROMIUM, else chromium on PATH, else None."""
    for exe in (os.environ.get("REID_RAY_CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser"),
                "/usr/bin/chromium"):
        if exe and os.access(exe, os.X_OK):
            return exe
    return None


@contextlib.contextmanager
def chromium(timeout_ms: int = 30_000) -> Iterator:
    """Headless system Chromium under Playwright, closed on exit."""
    exe = chromium_path()
    if exe is None:
        raise ReidRayError("no Chromium to drive: apt-get install chromium (Debian), or set REID_RAY_CHROMIUM to a "
                           "Chrome/Chromium binary")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, headless=True, timeout=timeout_ms)
        try:
            yield browser
        finally:
            browser.close()


def new_page(browser, width: int = 1600, height: int = 1000, timeout_ms: int = 30_000):
    """A page in a fresh browser profile (MLflow keeps expanded runs, columns and panels per profile)."""
    context = browser.new_context(viewport={"width": width, "height": height})
    context.add_init_script(_QUIET_ASSISTANT)
    page = context.new_page()
    page.set_default_timeout(timeout_ms)
    return page


@contextlib.contextmanager
def browser_page(width: int = 1600, height: int = 1000, timeout_ms: int = 30_000) -> Iterator:
    """One page in headless system Chromium, closed with the browser on exit."""
    with chromium(timeout_ms) as browser:
        yield new_page(browser, width, height, timeout_ms)


def runs_url(base_url: str, exp_id: str, mode: str = "TABLE", search_filter: str = "") -> str:
    """The experiment's runs page in the model-training view: mode TABLE (the runs table) or CHART; with
    `search_filter` (MLflow's run search syntax, e.g. tags.sweep = 'x') only the runs it matches."""
    url = f"{base_url}/#/experiments/{exp_id}/runs?workflowType=machine_learning&compareRunsMode={mode}"
    return url + (f"&searchFilter={urllib.parse.quote(search_filter)}" if search_filter else "")


def open_runs(page, base_url: str, exp_id: str, mode: str = "TABLE", search_filter: str = "") -> None:
    """Go to the runs page and wait until it lists the runs ("N matching runs")."""
    page.goto(runs_url(base_url, exp_id, mode, search_filter))
    page.get_by_role("heading", name="Runs", exact=True).wait_for()
    page.get_by_text(MATCHING_RUNS).wait_for()


def run_link(page, run_name: str):
    return page.get_by_role("link", name=run_name, exact=True)


def expand_run(page, parent: str, timeout_ms: int = 5000) -> None:
    """Show a parent run's nested runs: the expander (a button without a label) in the cell of its name,
    clicked once. The state is kept per browser profile, across the table and chart views."""
    cell = page.get_by_role("gridcell").filter(has=run_link(page, parent)).first
    cell.wait_for()
    rows = page.locator('[role="row"][row-id]')
    before = rows.count()
    cell.get_by_role("button").first.click()
    deadline = time.monotonic() + timeout_ms / 1000  # ag-grid adds the nested rows at once; a childless parent none
    while rows.count() <= before and time.monotonic() < deadline:
        page.wait_for_timeout(100)


def row_texts(page, run_name: str) -> list[str]:
    """The texts of every cell in the run's table row (its pinned and scrolled parts: one ag-grid row-id)."""
    row_id = page.locator('[role="row"]').filter(has=run_link(page, run_name)).first.get_attribute("row-id")
    return [t.strip() for t in page.locator(f'[role="row"][row-id="{row_id}"] [role="gridcell"]').all_inner_texts()]


def show_columns(page, names: list[str]) -> None:
    """Add params or metrics to the runs table through its "Columns" menu (search, tick, close)."""
    page.get_by_role("button", name="Columns", exact=True).click()
    menu = page.get_by_role("dialog")
    search = page.get_by_placeholder("Search columns")
    for name in names:
        search.fill(name)
        item = menu.get_by_text(name, exact=True)
        item.click()
    page.keyboard.press("Escape")
    for name in names:
        page.get_by_role("columnheader", name=name, exact=True).first.wait_for()


def filter_charts(page, text: str) -> None:
    """Keep the chart view's charts whose metric names contain `text`."""
    page.get_by_placeholder("Search metric charts").fill(text)


def chart_card(page, metric: str):
    """The chart view's card titled `metric` (its title is a heading)."""
    return page.get_by_test_id("experiment-view-compare-runs-card").filter(
        has=page.get_by_role("heading", name=metric, exact=True))


def plotted_traces(card) -> int:
    """The number of plotly traces drawn in a chart card (lines and markers count apart)."""
    card.locator(".js-plotly-plot").first.wait_for()
    return card.locator(".js-plotly-plot .scatterlayer .trace, .js-plotly-plot .barlayer .trace").count()


def _drag(page, x0: float, y0: float, x1: float, y1: float) -> None:
    page.mouse.move(x0, y0)
    page.mouse.down()
    page.mouse.move(x1, y1, steps=15)
    page.mouse.up()


def widen_run_list(page, by_px: int = 160) -> None:
    """Drag the border between the chart view's run list and its charts (the ew-resize bar) to the right."""
    header = page.get_by_role("columnheader", name="Run Name").first.bounding_box()
    search = page.get_by_placeholder("Search metric charts").bounding_box()
    if not header or not search:
        return
    y = header["y"] + 200
    x = page.evaluate("""([x0, x1, y]) => { for (let x = x0; x < x1; x++) { const e = document.elementFromPoint(x, y);
        if (e && getComputedStyle(e).cursor === 'ew-resize') return x + 4; } return null; }""",
                      [header["x"] + header["width"], search["x"], y])
    if x is not None:
        _drag(page, x, y, x + by_px, y)


def enlarge_chart(page, card, height_px: int = 560) -> None:
    """Resize a chart card to the grid's full width and `height_px` (at most to the window's bottom) by its
    corner handle (the one nearest the card's corner)."""
    box, grid = card.bounding_box(), page.get_by_test_id("draggable-chart-cards-grid").first.bounding_box()
    handles = [h.bounding_box() for h in page.get_by_test_id("draggable-card-resize-handle").all()]
    handles = [h for h in handles if h]
    if not box or not grid or not handles:
        return
    corner = (box["x"] + box["width"], box["y"] + box["height"])
    h = min(handles, key=lambda h: abs(h["x"] + h["width"] - corner[0]) + abs(h["y"] + h["height"] - corner[1]))
    bottom = min(box["y"] + height_px, page.viewport_size["height"] - 60)
    _drag(page, h["x"] + h["width"] / 2, h["y"] + h["height"] / 2, grid["x"] + grid["width"] - 4, bottom)


def screenshot_experiment(store_uri: str, experiment: str, out: str | os.PathLike, *, metric: str = "target_mAP",
                          sweep: str | None = None, width: int = 1440, height: int = 900) -> Path:
    """A PNG of the experiment in the model-training UI: the chart view of one sweep (`sweep`, default the
    newest; the whole experiment when it has none) with its trials listed under the parent and the chart
    of `metric` across them, full width."""
    out = Path(out)
    if store_uri.startswith("sqlite:///") and not Path(store_uri[len("sqlite:///"):]).is_file():
        raise ReidRayError(f"no MLflow store at {store_uri}: pass the --mlflow-uri of the sweep "
                           "(python -m reid_ray.tune prints it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    served = contextlib.nullcontext(store_uri.rstrip("/")) if store_uri.startswith(("http://", "https://")) else \
        mlflow_server(store_uri)
    with served as url, browser_page(width, height) as page:
        exp_id = experiment_id(url, experiment)
        parents = sweep_parents(url, exp_id)
        if sweep is not None and f"sweep-{sweep}" not in parents:
            raise ReidRayError(f"no sweep {sweep!r} in {experiment!r}; it has: "
                               f"{', '.join(p.removeprefix('sweep-') for p in parents) or 'none'}")
        parent = f"sweep-{sweep}" if sweep else (parents[0] if parents else None)
        # parent and trials carry the tag sweep=<name>: the table keeps them nested
        open_runs(page, url, exp_id, "CHART", f"tags.sweep = '{parent.removeprefix('sweep-')}'" if parent else "")
        if parent:
            expand_run(page, parent)
        widen_run_list(page)
        filter_charts(page, f"^{re.escape(metric)}$")  # the box takes a regular expression...
        card = chart_card(page, metric).first
        try:
            card.wait_for(timeout=5000)
        except Exception:  # ...or, in another MLflow, text only
            filter_charts(page, metric)
            card.wait_for()
        plotted_traces(card)
        enlarge_chart(page, card)
        page.mouse.move(1, height - 1)  # no hover tooltip in the picture
        page.wait_for_timeout(1000)     # plotly's relayout after the resize
        with atomic_path(out) as tmp:
            page.screenshot(path=str(tmp), type="png")
    return out


def main(argv=None) -> int:
    from reid_ray.cli import run_cli

    p = argparse.ArgumentParser(prog="python -m tests.mlflow_ui", description=__doc__.split("\n")[0])
    p.add_argument("--mlflow-uri", default=None, help="default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    p.add_argument("--experiment", default="synth-a->synth-b", help='default: "synth-a->synth-b"')
    p.add_argument("--sweep", default=None, help="the sweep shown (default: the experiment's newest)")
    p.add_argument("--metric", default="target_mAP", help="the metric charted (default target_mAP)")
    p.add_argument("--out", default="docs/mlflow-ui.png")
    p.add_argument("--width", type=int, default=1440)
    p.add_argument("--height", type=int, default=900)
    args = p.parse_args(argv)

    def _run(a):
        from reid_ray.tracking import resolve_uri

        path = screenshot_experiment(resolve_uri(a.mlflow_uri or ""), a.experiment, a.out, metric=a.metric, sweep=a.sweep,
                                     width=a.width, height=a.height)
        print(f"wrote {path}")
        return 0

    return run_cli(_run, args)


if __name__ == "__main__":
    sys.exit(main())
