"""Every row of the "When things go wrong" table (docs/troubleshooting.md): a user's mistake gets one line naming the
problem and the fix, exit code 2, and nothing written (no output folder, no synthetic data, no MLflow
store). All of them are caught before Ray starts, so none of these tests starts Ray."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from reid_ray.cli import main as cli_main
from reid_ray.cli.train import main as train_main
from reid_ray.cli.tune import main as tune_main


def _ckpt(path: Path, method: str = "baseline", arch: str = "small") -> str:
    torch.save({"method": {"models": {"net": {}}}, "epoch": 0, "config": {"method": method, "model": {"arch": arch}}},
               path)
    return str(path)


def _unsafe(path: Path) -> str:
    torch.save({"method": {}, "epoch": 0, "config": {}, "x": Path("/")}, path)  # a class instance: not weights
    return str(path)


def _truncated(path: Path) -> str:
    torch.save({"method": {"models": {"net": {"w": torch.zeros(4096)}}}, "epoch": 0,
                "config": {"method": "baseline", "model": {"arch": "small"}}}, path)
    path.write_bytes(path.read_bytes()[:6000])  # a crash or a full disk mid-write
    return str(path)


def _folder(path: Path) -> str:
    path.mkdir()
    return str(path)


def _crops(folder: Path, n: int, broken: int = 0, dangling: int = 0) -> Path:
    from tests.test_folder_target import crops

    return crops(folder, n, broken, dangling)


def _space(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


# (name, entry point, argv given tmp and the tiny benchmark, the message's words)
CASES = [
    ("unknown method", "train", lambda t, d: ["--method", "nope"], "unknown method 'nope'; valid: baseline"),
    ("unknown config key", "train", lambda t, d: ["--set", "nonsense=1"], "unknown config key 'nonsense'"),
    ("method parameter typo", "train", lambda t, d: ["--method", "mmt", "--set", "params.num_cluster=10"],
     "unknown parameter 'params.num_cluster' of method 'mmt'; valid names"),
    ("value of the wrong type", "train", lambda t, d: ["--set", "optim.lr=fast"], "optim.lr"),
    ("--set without =", "train", lambda t, d: ["--set", "epochs"], "expected key=value"),
    ("--epochs 0", "train", lambda t, d: ["--epochs", "0"], "epochs=0: epochs to train must be at least 1"),
    ("--eval-every 0", "train", lambda t, d: ["--eval-every", "0"], "eval_every=0"),
    ("checkpoint_every 0", "train", lambda t, d: ["--set", "checkpoint_every=0"],
     "checkpoint_every=0: epochs between checkpoints must be at least 1"),
    ("--workers 0", "train", lambda t, d: ["--workers", "0"], "workers=0: Ray Train workers must be at least 1"),
    ("negative learning rate", "train", lambda t, d: ["--set", "optim.lr=-1"], "optim.lr=-1.0: must be a positive"),
    ("milestones out of order", "train", lambda t, d: ["--set", "optim.milestones=[70,40]"], "must increase"),
    ("negative seed", "train", lambda t, d: ["--seed", "-1"], "seed=-1: must be zero or more"),
    ("unknown optimizer", "train", lambda t, d: ["--set", "optim.optimizer=rmsprop"], "valid: adam, sgd"),
    ("use_gpu not a choice", "train", lambda t, d: ["--set", "use_gpu=maybe"], "use_gpu='maybe'; valid"),
    ("unknown clustering backend", "train", lambda t, d: ["--set", "clustering.backend=gpu"],
     "clustering.backend='gpu'; valid: auto, faiss, torch"),
    ("unknown clustering algorithm", "train",
     lambda t, d: ["--method", "mmt", "--set", "params.cluster_algorithm=spectral"], "valid: kmeans, dbscan"),
    ("unknown dataset", "train", lambda t, d: ["--source", "market"], "unknown dataset 'market'; valid names"),
    ("a method that needs a source, with --source none", "train", lambda t, d: ["--method", "mmt", "--source", "none"],
     "mmt needs a labelled source, and --source none has none; the fully unsupervised setting runs"),
    ("--source none with a source model", "train",
     lambda t, d: ["--method", "spcl", "--source", "none", "--set", "params.source_init=true"],
     "--source none has no source to train one on"),
    ("--target folder that does not exist", "train",
     lambda t, d: ["--method", "mmt", "--data-root", str(d), "--target", f"folder:{t / 'nope'}"],
     "is not a folder; pass folder:PATH"),
    ("--target folder with no images", "train",
     lambda t, d: ["--method", "mmt", "--data-root", str(d), "--target", f"folder:{_folder(t / 'empty')}"],
     "holds no .jpg/.jpeg/.png images (searched recursively)"),
    ("--target folder with an unreadable image", "train",
     lambda t, d: ["--method", "mmt", "--data-root", str(d), "--target", f"folder:{_crops(t / 'cams', 8, broken=1)}"],
     "cam0/broken0.jpg in " + "{t}/cams is not a readable image"),
    ("--target folder with a link to nothing", "train",
     lambda t, d: ["--method", "mmt", "--data-root", str(d), "--target", f"folder:{_crops(t / 'links', 8, dangling=2)}"],
     "cam1/gone0.png in " + "{t}/links is a link to a file that does not exist and 1 more; remove the link"),
    ("--target folder with too few images for the clustering", "train",
     lambda t, d: ["--method", "mmt", "--data-root", str(d), "--target", f"folder:{_crops(t / 'few', 20)}",
                   "--set", "num_identities=4"], "k-means needs 2 ≤ k < the 20 target training images"),
    ("an image folder as the source", "train",
     lambda t, d: ["--source", f"folder:{_crops(t / 'src', 4)}"], "an image folder has no identity labels"),
    ("--metric target_mAP on an image folder", "train",
     lambda t, d: ["--method", "mmt", "--target", f"folder:{_crops(t / 'm', 4)}", "--metric", "target_mAP"],
     "--metric target_mAP needs target labels, and folder:m has none"),
    ("missing real dataset (nothing written)", "train",
     lambda t, d: ["--source", "market1501", "--data-root", _folder(t / "data")], "Market-1501"),
    ("P larger than the identities", "train",
     lambda t, d: ["--data-root", str(d), "--set", "num_identities=64"], "needs at least P=64 identities"),
    ("P not a multiple of the workers", "train",
     lambda t, d: ["--data-root", str(d), "--set", "num_identities=3"], "must divide evenly over 2 workers"),
    ("k of k-means ≥ target images", "train",
     lambda t, d: ["--method", "mmt", "--data-root", str(d), "--set", "num_identities=4",
                   "--set", "params.num_clusters=5000"], "params.num_clusters=5000: k-means needs 2 ≤ k <"),
    ("DBSCAN k1 ≥ target images", "train",
     lambda t, d: ["--method", "mmt", "--data-root", str(d), "--set", "num_identities=4",
                   "--set", "params.cluster_algorithm=dbscan", "--set", "params.k1=5000"], "0 < k2 ≤ k1 <"),
    ("mean-net momentum ≥ 1", "train",
     lambda t, d: ["--method", "mmt", "--data-root", str(d), "--set", "num_identities=4", "--set", "params.alpha=1",
                   "--set", "params.num_clusters=10"],
     "params.alpha=1.0"),
    ("ECN's knn_k ≥ memory size", "train",
     lambda t, d: ["--method", "ecn", "--data-root", str(d), "--set", "num_identities=4", "--set", "params.knn_k=5000"],
     "params.knn_k=5000: the neighbourhood needs"),
    ("ECN's target batch > target images", "train",
     lambda t, d: ["--method", "ecn", "--data-root", str(d), "--set", "num_identities=4",
                   "--set", "params.target_batch=5000"], "fewer than one batch of 5000"),
    ("MAR's target batch not a multiple of the workers", "train",
     lambda t, d: ["--method", "mar", "--data-root", str(d), "--set", "num_identities=4",
                   "--set", "params.target_batch=33"], "a batch of 33 must be a positive multiple of the 2 workers"),
    ("SpCL's eps_gap ≥ eps", "train",
     lambda t, d: ["--method", "spcl", "--data-root", str(d), "--set", "num_identities=4",
                   "--set", "params.eps_gap=0.9"], "0 < eps_gap < eps"),
    ("BN groups that do not divide the batch", "train",
     lambda t, d: ["--set", "model.samples_per_bn=5"], "samples_per_bn"),
    ("missing --config", "train", lambda t, d: ["--config", str(t / "nope.yaml")], "no such file"),
    ("--config not YAML", "train",
     lambda t, d: ["--config", _space(t / "bad.yaml", "epochs: [1,\n")], "not valid YAML"),
    ("--config not a mapping", "train",
     lambda t, d: ["--config", _space(t / "list.yaml", "- 1\n- 2\n")], "expected a mapping"),
    ("missing --resume", "train", lambda t, d: ["--resume", str(t / "nope")], "no such checkpoint"),
    ("--resume not a checkpoint", "train",
     lambda t, d: ["--resume", _space(t / "notes.txt", "hello")], "not a checkpoint torch can read"),
    ("--resume of another method", "train",
     lambda t, d: ["--method", "mmt", "--resume", _ckpt(t / "c.pt")], "a checkpoint of method 'baseline', not 'mmt'"),
    ("--resume of another backbone", "train",
     lambda t, d: ["--resume", _ckpt(t / "r50.pt", arch="resnet50"), "--set", "model.arch=small"],
     "a checkpoint of a resnet50 network"),
    ("--resume of a checkpoint cut short", "train",
     lambda t, d: ["--resume", _truncated(t / "cut.pt")], "cut.pt: not a checkpoint torch can read"),
    ("--output is a file", "train", lambda t, d: ["--output", _space(t / "out.txt", "x")],
     "--output " + "{t}/out.txt: a file, not a folder"),
    ("--output where nothing can be written", "train", lambda t, d: ["--output", "/sys/reid-ray-out"],
     "--output /sys/reid-ray-out: cannot write in /sys"),
    ("--data-root is a file", "train", lambda t, d: ["--data-root", _space(t / "data.txt", "x")],
     "--data-root " + "{t}/data.txt: a file, not a folder"),
    ("--mlflow-uri names a folder", "train",
     lambda t, d: ["--mlflow-uri", f"sqlite:///{_folder(t / 'store')}"], "store: a folder, not a file"),
    ("--init is a folder", "train",
     lambda t, d: ["--method", "ecn", "--data-root", str(d), "--init", _folder(t / "weights")],
     "--init " + "{t}/weights: a folder, not a file"),
    ("--config is a folder", "train", lambda t, d: ["--config", _folder(t / "conf")], "conf: a folder, not a file"),
    ("a GPU asked for where there is none", "train",
     lambda t, d: ["--data-root", str(d), "--set", "num_identities=4", "--set", "use_gpu=true"],
     "no GPU torch can use and no Ray cluster to add one (RAY_ADDRESS is unset); pass --set use_gpu=false"),
    ("a captured step where there is no GPU", "train",
     lambda t, d: ["--data-root", str(d), "--set", "num_identities=4", "--workers", "1", "--set",
                   "model.cuda_graph=true"],
     "model.cuda_graph=true, but this machine has no GPU torch can use"),
    ("a captured step of a method that cannot", "train",
     lambda t, d: ["--method", "ecn", "--workers", "1", "--set", "model.cuda_graph=true"],
     "ecn's step cannot be captured in a CUDA graph"),
    ("a captured step over several workers", "train",
     lambda t, d: ["--workers", "2", "--set", "model.cuda_graph=true"], "pass --workers 1"),
    ("--resume that could run code", "train",
     lambda t, d: ["--resume", _unsafe(t / "evil.pt")], "refused by the safe checkpoint loader"),
    ("too many --init checkpoints", "train",
     lambda t, d: ["--method", "ecn", "--init", _ckpt(t / "a.pt"), _ckpt(t / "b.pt")],
     "ecn starts from one source model, got 2"),
    ("missing --init", "train",
     lambda t, d: ["--method", "ecn", "--data-root", str(d), "--set", "num_identities=4", "--init", str(t / "nope.pt")],
     "no such checkpoint file"),
    ("unknown MLflow URI scheme", "train",
     lambda t, d: ["--data-root", str(d), "--set", "num_identities=4", "--mlflow-uri", "ftp://host/x"],
     "unknown scheme"),
    ("MLflow server unreachable at start", "train",
     lambda t, d: ["--data-root", str(d), "--set", "num_identities=4", "--mlflow-uri", "http://127.0.0.1:9"],
     "is unreachable"),
    ("--num-samples 0", "tune", lambda t, d: ["--num-samples", "0", "--output", str(t / "out")],
     "a sweep needs at least one trial"),
    ("search space low > high", "tune",
     lambda t, d: ["--search-space", _space(t / "s.yaml", "params:\n  optim.lr: {distribution: uniform, low: 0.1, "
                                                          "high: 0.01}\n")], "must be below high"),
    ("missing search space", "tune", lambda t, d: ["--search-space", str(t / "nope.yaml")], "search space"),
    ("a swept range no trial could train", "tune",
     lambda t, d: ["--method", "mmt", "--data-root", str(d), "--set", "num_identities=4", "--output", str(t / "out"),
                   "--set", "params.num_clusters=10",
                   "--search-space", _space(t / "k.yaml", "params:\n  params.num_clusters: {distribution: int, "
                                                          "low: 10, high: 5000}\n")],
     "params.num_clusters = 5000 would fail a trial"),
    ("--max-concurrent 0", "tune", lambda t, d: ["--max-concurrent", "0", "--output", str(t / "out")],
     "--max-concurrent 0: at least 1 trial at a time (leave the flag out"),
    ("--grace-period 0", "tune", lambda t, d: ["--grace-period", "0", "--output", str(t / "out")],
     "--grace-period 0: ASHA needs at least 1 epoch"),
    ("--reduction-factor 1", "tune", lambda t, d: ["--reduction-factor", "1", "--output", str(t / "out")],
     "--reduction-factor 1.0: ASHA keeps 1/factor"),
    ("--gpus-per-worker below 0", "tune", lambda t, d: ["--gpus-per-worker", "-1", "--output", str(t / "out")],
     "--gpus-per-worker -1.0: must be 0 (CPU) or more"),
    ("--gpus-per-worker where there is no GPU", "tune",
     lambda t, d: ["--gpus-per-worker", "1", "--output", str(t / "out")], "pass --gpus-per-worker 0"),
    ("tune --set use_gpu=true where there is no GPU", "tune",
     lambda t, d: ["--set", "use_gpu=true", "--output", str(t / "out")], "pass --gpus-per-worker 0"),
    ("tune --output is a file", "tune", lambda t, d: ["--output", _space(t / "o.txt", "x"), "--data-root", str(d)],
     "o.txt: a file, not a folder"),
    ("--search-space is a folder", "tune", lambda t, d: ["--search-space", _folder(t / "spaces")],
     "spaces: a folder, not a file"),
    ("--resume of a sweep that does not exist", "tune",
     lambda t, d: ["--resume", "--name", "nosuch", "--output", str(t / "out")], "no sweep named 'nosuch'"),
    ("embed --out is a folder", "cli",
     lambda t, d: ["embed", "--checkpoint", _ckpt(t / "c.pt"), "--images", str(d / "synth-b"), "--out",
                   _folder(t / "feats")], "--out " + "{t}/feats: a folder, not a file"),
    ("embed --images is a file", "cli",
     lambda t, d: ["embed", "--checkpoint", _ckpt(t / "c.pt"), "--images", _space(t / "i.jpg", "x"), "--out",
                   str(t / "f.parquet")], "--images " + "{t}/i.jpg: a file, not a folder"),
    ("export --onnx is a folder", "cli",
     lambda t, d: ["export", "--checkpoint", _ckpt(t / "c.pt"), "--onnx", _folder(t / "model")],
     "--onnx " + "{t}/model: a folder, not a file"),
    ("missing dataset folder (datasets)", "cli",
     lambda t, d: ["datasets", "market1501", "--data-root", str(t / "data")], "Market-1501"),
]


def _writable(folder: str) -> bool:
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


@pytest.mark.parametrize("name, entry, argv, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_nothing_written(name, entry, argv, message, tiny_synth, tmp_path, capsys,
                                                          monkeypatch):
    monkeypatch.chdir(tmp_path)  # the defaults (outputs/, mlflow.db, data/) would land here
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # a local Ray, which has no autoscaler ...
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # ... on a machine without a GPU
    if name == "--output where nothing can be written" and _writable("/sys"):
        pytest.skip("/sys is writable here")
    args = argv(tmp_path, tiny_synth)
    message = message.replace("{t}", str(tmp_path))
    before = set(tmp_path.rglob("*"))
    if entry == "train":
        args = [*args, *([] if "--output" in args else ["--output", str(tmp_path / "out")])]
    main = {"train": train_main, "tune": tune_main, "cli": cli_main}[entry]
    assert main(args) == 2
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("reid-ray: error: "), err
    assert message in lines[0], lines[0]
    assert "Traceback" not in out + err
    written = set(tmp_path.rglob("*")) - before - {tmp_path / "cache"}
    assert not [p for p in written if "cache" not in p.parts], sorted(written)


def test_the_readme_table_lists_every_case():
    readme = (Path(__file__).resolve().parents[1] / "docs" / "troubleshooting.md").read_text()
    table = readme.split("## When things go wrong", 1)[1]
    missing = [c[0] for c in CASES if f"| {c[0]} |" not in table]
    assert not missing, missing


def test_every_fault_the_readme_promises_names_a_test_that_exists():
    import re

    root = Path(__file__).resolve().parents[1]
    page = (root / "docs" / "troubleshooting.md").read_text()
    section = page.split("**What survives what**", 1)[1].split("**Resuming:**", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "---" not in line][1:]
    defined = set(re.findall(r"^def (test_\w+)", "\n".join(p.read_text() for p in (root / "tests").glob("test_*.py")),
                             re.MULTILINE))
    assert len(rows) >= 10
    for row in rows:
        cited = [name.rstrip("_") for name in re.findall(r"`(test_\w+)", row.rsplit("|", 2)[1])]
        assert cited, row
        for name in cited:  # a cited name may be cut short with an ellipsis: a prefix of the test's name
            assert any(d.startswith(name) for d in defined), f"docs/troubleshooting.md cites {name}, which no test defines"


def test_a_damaged_image_names_its_path(tmp_path):
    from reid_ray import ReidRayError
    from reid_ray.data.loader import ImageDataset

    bad = tmp_path / "0001_c1s1_000001_00.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ReidRayError, match=f"{bad}: not a readable image"):
        ImageDataset._load(str(bad))


class _Unreadable(torch.utils.data.Dataset):
    """A dataset whose loader process meets a user's mistake (a damaged image, a wrong path)."""

    def __init__(self, error: type):
        self.error = error

    def __len__(self):
        return 2

    def __getitem__(self, i):
        raise self.error("/data/0001_c1s1_000001_00.jpg: not a readable image\n(replace or remove it)")


@pytest.mark.parametrize("kind", ["ReidRayError", "Diverged"])
def test_an_error_in_a_loader_process_reaches_the_user_as_its_own_message(kind):
    """torch re-raises a loader process's exception with its own wrapper text ("Caught ... in DataLoader worker
    process 0. Original Traceback ..."): the user's line is the original message."""
    import reid_ray
    from reid_ray.cli import run_cli

    error = getattr(reid_ray, kind)
    with pytest.raises(error) as caught:
        next(iter(torch.utils.data.DataLoader(_Unreadable(error), num_workers=1)))
    assert str(caught.value) == "/data/0001_c1s1_000001_00.jpg: not a readable image\n(replace or remove it)"

    def fail(_args):
        raise caught.value

    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert run_cli(fail, None) == 2
    assert err.getvalue() == ("reid-ray: error: /data/0001_c1s1_000001_00.jpg: not a readable image "
                              "(replace or remove it)\n")


NUMERIC_FLAGS = [  # (entry point, flag, smallest valid value): every count, size and limit a command line takes
    ("train", "--workers", 1), ("train", "--epochs", 1), ("train", "--eval-every", 1), ("train", "--seed", 0),
    ("tune", "--num-samples", 1), ("tune", "--max-concurrent", 1), ("tune", "--grace-period", 1),
    ("tune", "--workers-per-trial", 1), ("tune", "--epochs", 1), ("tune", "--gpus-per-worker", 0),
    ("tune", "--reduction-factor", 1.5),
]


@pytest.mark.parametrize("entry, flag, low", NUMERIC_FLAGS, ids=[f"{e} {f}" for e, f, _ in NUMERIC_FLAGS])
def test_every_numeric_flag_at_0_and_below_is_one_line_naming_it(entry, flag, low, tmp_path, capsys, monkeypatch):
    """Nothing means "no limit" by being 0: below its smallest valid value, every flag is refused before Ray starts."""
    monkeypatch.chdir(tmp_path)
    main = {"train": train_main, "tune": tune_main}[entry]
    for value in sorted({0, -1, low - 1} - {v for v in (0, -1) if v >= low}):
        assert main([flag, str(value), "--output", str(tmp_path / "out")]) == 2, (flag, value)
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and err.startswith("reid-ray: error: "), err
        assert flag in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("key", sorted(__import__("reid_ray.config.checks", fromlist=["MINIMUM"]).MINIMUM))
def test_every_config_count_below_its_minimum_is_one_line_naming_the_key(key, tmp_path, capsys, monkeypatch):
    from reid_ray.config.checks import MINIMUM

    monkeypatch.chdir(tmp_path)
    low = MINIMUM[key][0]
    assert train_main(["--set", f"{key}={int(low) - 1}", "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"reid-ray: error: {key}={int(low) - 1}"), err  # (-1 or -1.0)
    assert not (tmp_path / "out").exists()
