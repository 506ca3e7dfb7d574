import os
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

# before torch starts OpenMP: passive waiting, as train.init_ray gives Ray's workers (see there)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402

from reid_ray.data.synthetic import SynthConfig, generate_synthetic  # noqa: E402

# A small benchmark shared by every test of a session: 12 train + 8 test ids per domain.
TINY = SynthConfig(train_ids=12, test_ids=8, images_per_id=(6, 8), cameras_per_id=(2, 3), num_cameras=3)


@pytest.fixture(scope="session")
def tiny_synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate_synthetic(root, TINY)
    return root


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    # manifests cached by a test never leak into the user's ~/.cache or other tests
    monkeypatch.setenv("REID_RAY_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray per test module (sharing it saves ~4 s per test), started as the
    CLI starts it: a new instance even beside a `ray start` cluster, with its API server named for Ray Train's
    placement-group cleaner (otherwise a stale /tmp/ray/ray_current_cluster costs every run 12 s at its end)."""
    import ray

    from reid_ray.distributed.runtime import init_ray
    if ray.is_initialized():  # left connected by a module that failed: this module's Ray is its own
        ray.shutdown()
    init_ray()
    yield
    ray.shutdown()


def cli_env(cwd: Path) -> dict[str, str]:
    """A user's environment: none of the test's Ray or pytest variables, an 80-column terminal, a cache of
    its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "PYTEST"))}
    env.update(COLUMNS="80", REID_RAY_CACHE=str(cwd / "cache"))
    return env


def run_cli(args: list[str], cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    """`python -m ...` in a fresh process, as a user runs it (cli_env)."""
    return subprocess.run([sys.executable, *args], cwd=cwd, env=cli_env(cwd), capture_output=True, text=True,
                          timeout=timeout)


def seed_source_models(cfg, count: int | None = None) -> list[Path]:
    """The source models `cfg`'s method starts from, trained in this process (seconds, no Ray) into the cache
    the driver reads first (`driver.pretraining_plan`), in the format it writes: a Ray test of a UDA method then
    pays no source training under Ray that none of its assertions looks at. The Ray path of the pretraining
    stays tested where a test asserts it (test_kill_and_resume: two source models, trained once and cached).
    `count`: the first that many of them only (the others are trained under Ray, as a user's run trains them)."""
    import dataclasses
    import json

    import torch

    from reid_ray.config import to_dict
    from reid_ray.data.domains import load_domains
    from reid_ray.distributed.driver import pretraining_plan
    from reid_ray.methods import METHODS, EpochContext, method_class
    from reid_ray.training.loop import evaluate_method, train_epoch

    paths = []
    n = method_class(cfg.method).source_models(cfg.params)
    for i in range(n if count is None else min(count, n)):
        cached, pre = pretraining_plan(dataclasses.replace(cfg, seed=cfg.seed + i))
        if not Path(cached).is_file():
            domains = load_domains(pre.source, pre.target, pre.data_root)
            method = METHODS["baseline"](pre, domains, torch.device("cpu"))
            method.setup()
            for epoch in range(pre.epochs):
                train_epoch(method, EpochContext(epoch))
            metrics = {"epoch": float(pre.epochs)}
            for name, ds in (("source", domains.source), ("target", domains.target)):
                if ds.labelled:  # a user's image folder has no query/gallery
                    metrics.update(evaluate_method(method, ds, pre, name)[0])
            Path(cached).parent.mkdir(parents=True, exist_ok=True)
            Path(cached).with_suffix(".json").write_text(json.dumps(metrics, indent=1))
            torch.save({"method": method.state_dict(), "epoch": pre.epochs - 1, "config": to_dict(pre)}, cached)
        paths.append(Path(cached))
    return paths


def seed_sweep_source_models(argv: list[str], count: int | None = None) -> list[Path]:
    """`seed_source_models` for the sweep that `python <argv>` (`-m reid_ray.tune ...`) would run."""
    from reid_ray.cli.tune import build_parser, prepare_sweep

    base = prepare_sweep(build_parser().parse_args(argv[2:])).base
    base.use_gpu = "false"  # what run_sweep sets before it asks for the source models, on a machine without GPUs
    return seed_source_models(base, count)


@dataclass
class CliRun:
    """One CLI run that several tests read: its folder, argv, MLflow store and what it printed."""

    root: Path
    argv: list[str]
    uri: str
    proc: subprocess.CompletedProcess

    @property
    def text(self) -> str:
        return self.proc.stdout + self.proc.stderr


@pytest.fixture(scope="session")
def cli_training(tiny_synth, tmp_path_factory) -> CliRun:
    """`python -m reid_ray.train` (the baseline, 4 epochs evaluated at 2 and 4, one checkpoint: checkpoint_every 4):
    the console tests read its output, the Ray Train tests its checkpoint and MLflow run, the interrupt test
    compares its stopped and resumed twin with it (one run instead of one per test: most of a run is Ray's
    fixed cost; 4 short epochs leave a stop after the first checkpoint work to interrupt)."""
    root = tmp_path_factory.mktemp("cli_training")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    argv = ["-m", "reid_ray.train", "--data-root", str(tiny_synth), "--epochs", "4", "--eval-every", "2",
            "--output", str(root / "out"), "--mlflow-uri", uri, "--name", "quiet", "--set", "num_identities=4",
            "--set", "warmup_epochs=1", "--set", "log_model=false",
            "--set", "checkpoint_every=4"]
    return CliRun(root, argv, uri, run_cli(argv, root))


@pytest.fixture(scope="session")
def cli_sweep(tmp_path_factory) -> CliRun:
    """`python -m reid_ray.tune --method mmt` (2 trials of 2 epochs, Optuna + ASHA, two source models): the
    console tests read its output, the sweep tests its folder, MLflow store and Optuna study."""
    root = tmp_path_factory.mktemp("cli_sweep")
    data = root / "data"
    generate_synthetic(data, SynthConfig(train_ids=16, test_ids=10, images_per_id=(6, 8), cameras_per_id=(2, 3),
                                         num_cameras=3, camstyle=False, texture=False))
    space = root / "space.yaml"
    space.write_text("params:\n  params.num_clusters: {distribution: int, low: 8, high: 16}\n"
                     "  optim.lr: {distribution: loguniform, low: 1.0e-4, high: 1.0e-3}\n"
                     "fixed:\n  loader.num_identities: 8\n  pretrain_epochs: 1\n")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    argv = ["-m", "reid_ray.tune", "--method", "mmt", "--data-root", str(data), "--search-space", str(space),
            "--num-samples", "2", "--epochs", "2", "--grace-period", "1", "--output", str(root / "out"),
            "--mlflow-uri", uri, "--name", "t", "--optuna-storage", f"sqlite:///{root / 'optuna.db'}",
            "--set", "two_sources=true"]  # the demo's default is one source model
    # the first source model cached here; the second is pretrained under Ray by the sweep, whose MLflow run the
    # report test reads (a baseline beside the MMT trials)
    seed_sweep_source_models(argv, count=1)
    return CliRun(root, argv, uri, run_cli(argv, root))


# --------------------------------------------------------------------------- the suite's time budget

SUITE_BUDGET_S = 15 * 60  # `make test` on 2 cores (CONTRIBUTING.md); printed against, never failed on: a noisy machine is slow
TEST_BUDGET_S = {"ray": 60.0, "other": 10.0}  # a test's own time (setup + call + teardown, shared fixtures apart)
_budgets: dict[str, float] = {}
_slow: set[str] = set()  # the tests `make test-quick` (-m "not ray and not faults") leaves out
_RAY_FIXTURES = {"ray_local", "cli_training", "cli_sweep"}  # a test that uses one runs Ray: marked `ray` for it
_unmarked_ray: list[str] = []  # tests not marked `ray` that left Ray running in this process
_own: dict[str, float] = defaultdict(float)
_shared: dict[str, float] = defaultdict(float)  # "scope fixture name" -> its setup, charged to no test
_current: dict = {"test": "", "ray_up": False}
_started = time.monotonic()


class _Clock:
    """The suite's time per test, registered as a plugin of its own (pytest_configure): a conftest's hooks see
    only the nodes under its folder, and a session fixture is set up for the session's node."""

    @pytest.hookimpl(tryfirst=True)  # before `-m` selects: the marker added here counts
    def pytest_collection_modifyitems(self, items):
        for item in items:
            if _RAY_FIXTURES & set(getattr(item, "fixturenames", ())) and not item.get_closest_marker("ray"):
                item.add_marker(pytest.mark.ray)
            if item.get_closest_marker("faults") or item.get_closest_marker("ray"):
                _slow.add(item.nodeid)
            mark = item.get_closest_marker("budget")
            _budgets[item.nodeid] = float(mark.args[0]) if mark else TEST_BUDGET_S[
                "ray" if item.get_closest_marker("ray") else "other"]

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item):
        _current["test"] = item.nodeid
        _current["ray_up"] = _ray_up()

    @pytest.hookimpl(hookwrapper=True)
    def pytest_fixture_setup(self, fixturedef, request):
        t0 = time.monotonic()
        yield
        if fixturedef.scope != "function":  # set up once for many tests: not the first user's own time
            took = time.monotonic() - t0
            _shared[f"{fixturedef.scope} fixture {fixturedef.argname}"] += took
            _own[_current["test"]] -= took

    def pytest_runtest_logreport(self, report):
        _own[report.nodeid] += report.duration

    @pytest.hookimpl(trylast=True)
    def pytest_runtest_teardown(self, item):
        """The quick tier's promise, checked: a test that starts Ray in this process carries the `ray` marker."""
        if item.nodeid not in _slow and not _current.get("ray_up") and _ray_up():
            _unmarked_ray.append(item.nodeid)


def _ray_up() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def pytest_configure(config):
    config.pluginmanager.register(_Clock(), "reid-ray-clock")


def _time_report(terminalreporter) -> None:
    """The suite's time in CI's log: the total against the budget, per file, the shared fixtures, and each test
    past its budget (`TEST_BUDGET_S`, or its own `@pytest.mark.budget(s)`)."""
    tests = [nodeid for nodeid in _own if nodeid]
    if not tests:
        return
    total, wall = sum(_own.values()) + sum(_shared.values()), time.monotonic() - _started
    tr = terminalreporter
    tr.section("the suite's time")
    tr.write_line(f"{len(tests)} tests: {wall:.0f} s of pytest (tests and fixtures {total:.0f} s); budget "
                  f"{SUITE_BUDGET_S} s on 2 cores: {'within it' if wall <= SUITE_BUDGET_S else f'{wall - SUITE_BUDGET_S:.0f} s over'}")
    slow = [nodeid for nodeid in tests if nodeid in _slow]
    if slow and len(slow) < len(tests):
        quick = sum(_own[n] for n in tests if n not in _slow)
        tr.write_line(f"  of which {len(slow)} `ray` or `faults` tests {sum(_own[n] for n in slow):.0f} s, the other "
                      f"{len(tests) - len(slow)} (what `make test-quick` runs, shared fixtures apart) {quick:.0f} s")
    for nodeid in _unmarked_ray:
        tr.write_line(f"  not marked `ray` but left Ray running (make test-quick would run it): {nodeid}")
    files: dict[str, float] = defaultdict(float)
    for nodeid in tests:
        files[nodeid.split("::")[0]] += _own[nodeid]
    for name, took in sorted(files.items(), key=lambda kv: -kv[1])[:12]:
        tr.write_line(f"  {took:7.1f} s  {name}")
    for name, took in sorted(_shared.items(), key=lambda kv: -kv[1]):
        if took >= 1:
            tr.write_line(f"  {took:7.1f} s  {name} (set up once, charged to no test)")
    over = [(nodeid, took, _budgets[nodeid]) for nodeid, took in _own.items()
            if nodeid in _budgets and took > _budgets[nodeid]]
    for nodeid, took, budget in sorted(over, key=lambda t: t[2] - t[1]):
        tr.write_line(f"  over budget: {nodeid} took {took:.1f} s (budget {budget:.0f} s)")


def pytest_terminal_summary(terminalreporter):
    """The suite's time, then the fault tests' record of Ray's deaths (tests/ray_helpers.RECORDS), last: where
    CI's log is cut, its end is kept."""
    from tests.ray_helpers import RECORDS

    _time_report(terminalreporter)
    if RECORDS:
        terminalreporter.section("Ray's record of unexpected deaths in fault tests")
        for rec in RECORDS:
            terminalreporter.write_line(rec)
