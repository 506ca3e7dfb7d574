import os
import subprocess
import sys
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
    """One local Ray per test module (PLATFORM_NOTES.md: sharing it saves ~4 s per test), started as the
    CLI starts it: a new instance even beside a `ray start` cluster, with its API server named for Ray Train's
    placement-group cleaner (otherwise a stale /tmp/ray/ray_current_cluster costs every run 12 s at its end)."""
    import ray

    from reid_ray.distributed.runtime import init_ray
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
    """`python -m reid_ray.train` (the baseline, 2 epochs, one checkpoint: checkpoint_every 2): the console tests
    read its output, the Ray Train tests its checkpoint and MLflow run (one run instead of one per test: most
    of a run is Ray's fixed cost)."""
    root = tmp_path_factory.mktemp("cli_training")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    argv = ["-m", "reid_ray.train", "--data-root", str(tiny_synth), "--epochs", "2", "--eval-every", "1",
            "--output", str(root / "out"), "--mlflow-uri", uri, "--name", "quiet", "--set", "num_identities=4",
            "--set", "warmup_epochs=1", "--set", "log_model=false",
            "--set", "checkpoint_every=2"]
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
    return CliRun(root, argv, uri, run_cli(argv, root))


def pytest_terminal_summary(terminalreporter):
    """The fault tests' record of Ray's deaths (tests/ray_helpers.RECORDS), last: where CI's log is cut, its
    end is kept."""
    from tests.ray_helpers import RECORDS

    if RECORDS:
        terminalreporter.section("Ray's record of unexpected deaths in fault tests")
        for rec in RECORDS:
            terminalreporter.write_line(rec)
