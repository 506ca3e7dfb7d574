"""MLflow's comparison UI shows a reid-ray sweep: `mlflow server` over a store, headless Chromium.

The store (a new sqlite file served by `mlflow server`) is written through the server by reid-ray's own
tracking functions, with the structure a sweep writes (reid_ray/distributed/sweep.py): a parent run
`sweep-<name>` (tag sweep_parent=true) and one nested run per trial (tag mlflow.parentRunId, trial_id,
sweep, method; params = the flattened MMT config with the swept params.alpha and optim.lr; target_mAP,
target_R1, loss per epoch, step = epoch). A real sweep, even of two one-epoch trials on a tiny benchmark,
takes about two minutes on 2 cores (Ray, Tune, Ray Train per trial; test_tune.py runs one). No Ray here.
"""

from __future__ import annotations

import copy

import pytest

from tests import mlflow_ui as ui

pytestmark = pytest.mark.skipif(ui.chromium_path() is None,
                                reason="no Chromium to drive (CI installs Debian's chromium in .ci/run; locally: "
                                       "apt-get install chromium, or REID_RAY_CHROMIUM=/path/to/chrome)")

EXPERIMENT = "synth-a->synth-b"
SWEEP = "mmt-ui"
# trial id, params.alpha, optim.lr, target mAP per epoch (the last one stopped by ASHA after 2 epochs)
TRIALS = [("0a1b03a8", 0.9759, 0.00012, [30.1, 38.2, 44.8]),
          ("8cb5214a", 0.985, 0.00026, [28.0, 35.5, 40.5]),
          ("cbd558cc", 0.9714, 0.00022, [25.3, 39.5])]
TRIAL_RUNS = [f"{SWEEP}-{tid}" for tid, *_ in TRIALS]


def write_sweep(uri: str) -> None:
    """A finished 3-trial MMT sweep, through reid_ray.tracking as the sweep and its trials' rank 0 write it."""
    from reid_ray import tracking
    from reid_ray.config import apply_overrides, flatten, resolve_config

    base = resolve_config("mmt", "synth-a", "synth-b")
    pair = {"method": "mmt", "source_to_target": "synth-a->synth-b"}
    parent = tracking.start_run(
        uri, EXPERIMENT, f"sweep-{SWEEP}",
        {"sweep.num_samples": len(TRIALS), "sweep.scheduler": "asha", "sweep.search_space": "search_spaces/mmt.yaml",
         **flatten(base)},
        {**pair, "sweep": SWEEP, "sweep_parent": "true"}, {})
    for tid, alpha, lr, maps in TRIALS:
        cfg = apply_overrides(copy.deepcopy(base), {"params.alpha": alpha, "optim.lr": lr})
        cfg.name = f"{SWEEP}-{tid}"
        run = tracking.start_run(uri, EXPERIMENT, cfg.name, flatten(cfg),
                                 {**pair, "source": "synth-a", "target": "synth-b", "mlflow.parentRunId": parent,
                                  "sweep": SWEEP, "trial_id": tid, tracking.RUN_KEY: cfg.name, "status": "running"}, {})
        for epoch, m in enumerate(maps, 1):
            tracking.log_metrics(uri, run, {"epoch": epoch, "loss": 6.0 - epoch, "target_mAP": m, "target_R1": m + 10},
                                 step=epoch)
        done = len(maps) == 3
        tracking.set_status(uri, run, "FINISHED" if done else "KILLED", "completed" if done else "stopped by ASHA")
    tracking.end_run(uri, parent)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`mlflow server` over a new sqlite store, the sweep written through it (`--mlflow-uri http://...`): half
    the time of writing the sqlite file first (every tracking call opens its own client, and a sqlite client
    checks the schema)."""
    store = tmp_path_factory.mktemp("mlflow-ui") / "mlflow.db"
    with ui.mlflow_server(f"sqlite:///{store}", start_timeout_s=120) as url:
        write_sweep(url)
        yield url, ui.experiment_id(url, EXPERIMENT)


@pytest.fixture(scope="module")
def browser():
    with ui.chromium(timeout_ms=30_000) as b:
        yield b


@pytest.fixture
def page(browser):
    page = ui.new_page(browser, 1600, 1000, timeout_ms=30_000)
    yield page
    page.context.close()


def test_the_sweep_opens_in_the_model_training_runs_view_with_its_trials(server, page):
    url, exp_id = server
    ui.open_runs(page, url, exp_id)
    assert "/runs" in page.url and "workflowType=machine_learning" in page.url
    # the runs table of the model-training view, not the GenAI overview (traces, token usage, evaluation runs)
    page.get_by_role("columnheader", name="Run Name", exact=True).first.wait_for()
    page.get_by_text(f"{len(TRIALS) + 1} matching runs").wait_for()
    for genai_only in ("Token Usage", "Evaluation runs", "Prompts"):
        assert page.get_by_text(genai_only, exact=True).count() == 0, genai_only
    # the trials are nested under the sweep's parent run: expanded, every one is listed by name
    ui.run_link(page, f"sweep-{SWEEP}").wait_for()
    ui.expand_run(page, f"sweep-{SWEEP}")
    for name in TRIAL_RUNS:
        ui.run_link(page, name).wait_for(state="visible")


def test_the_swept_parameters_are_columns_of_the_trials(server, page):
    url, exp_id = server
    ui.open_runs(page, url, exp_id)
    ui.expand_run(page, f"sweep-{SWEEP}")
    ui.show_columns(page, ["params.alpha", "optim.lr"])
    for header in ("params.alpha", "optim.lr"):
        assert page.get_by_role("columnheader", name=header, exact=True).first.is_visible()
    for (_, alpha, lr, _), name in zip(TRIALS, TRIAL_RUNS):
        cells = ui.row_texts(page, name)
        assert str(alpha) in cells and str(lr) in cells, (name, cells)


def test_a_target_mAP_chart_compares_the_trials(server, page):
    url, exp_id = server
    ui.open_runs(page, url, exp_id, "CHART")
    ui.expand_run(page, f"sweep-{SWEEP}")
    for name in TRIAL_RUNS:  # the chart view's run list
        ui.run_link(page, name).wait_for(state="visible")
    ui.filter_charts(page, "target_mAP")
    card = ui.chart_card(page, "target_mAP").first
    card.wait_for(state="visible")
    # one line per trial at least (plotly draws a trace per run; markers may add their own)
    assert ui.plotted_traces(card) >= len(TRIALS)
    assert card.get_by_text("Step", exact=True).count() >= 1  # a metric-history line chart, step = epoch
    assert any(card.get_by_text(name).count() for name in TRIAL_RUNS)  # its legend names trials
