"""The layering promised in docs/architecture.md, checked on the source tree."""

import ast
import re
from pathlib import Path

import pytest

from reid_ray import ReidRayError
from reid_ray.config import load_config_file, resolve_config

PACKAGE = Path(__file__).resolve().parent.parent / "reid_ray"
RAY_LAYER = PACKAGE / "distributed"


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(tree: ast.AST) -> set[int]:
    """The ids of import nodes under `if TYPE_CHECKING:` (annotations only: never run)."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def import_graph() -> dict[str, set[str]]:
    """Module -> the reid_ray modules it imports, anywhere in the file (a function's lazy import too: it hides a
    cycle, it does not remove one), except under TYPE_CHECKING. Importing a.b.c runs the packages a.b and a as
    well; a module's own enclosing packages are left out (a package importing its parts is not a cycle)."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text())
        skip = _type_checking_only(tree)
        targets = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets.add(node.module)
                targets.update(f"{node.module}.{a.name}" for a in node.names)  # `from pkg import module`
        own = {name.rsplit(".", i)[0] for i in range(1, name.count(".") + 1)}
        edges = set()
        for t in targets:
            if not t.startswith("reid_ray"):
                continue
            explicit = t
            while t and t not in files:
                t = t.rpartition(".")[0]
            if not t:
                continue
            edges.add(t)
            edges.update(p for p in {t.rsplit(".", i)[0] for i in range(1, t.count(".") + 1)} - own if p in files)
            if explicit in files:
                edges.add(explicit)
        graph[name] = edges - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    graph = import_graph()
    assert cycles(graph) == []
    # the check can fail: a cycle through a lazy import is found
    assert cycles({**graph, "reid_ray.methods.base": graph["reid_ray.methods.base"] | {"reid_ray.config.schema"}})
    assert "reid_ray.methods.base" in graph["reid_ray.config.schema"]  # config reads each method's Params


def test_the_layers_show_in_the_package():
    loose = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(loose) <= 6, loose
    assert {"cli", "config", "training", "inference", "tracking", "distributed"} <= {
        p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}


def test_only_the_ray_layer_imports_ray():
    offenders = {str(p.relative_to(PACKAGE)): sorted(m for m in imported_modules(p) if m == "ray" or m.startswith("ray."))
                 for p in PACKAGE.rglob("*.py") if RAY_LAYER not in p.parents}
    assert {k: v for k, v in offenders.items() if v} == {}
    assert any("ray" in imported_modules(p) or any(m.startswith("ray.") for m in imported_modules(p))
               for p in RAY_LAYER.rglob("*.py"))  # the check can fail: the layer does import Ray
    assert "ray" not in imported_modules(RAY_LAYER / "resources.py")  # the planner is pure arithmetic


def test_shared_code_names_no_method():
    pattern = re.compile(r"\b(mmt|ecn|mar|san|init2|two_sources|num_clusters)\b", re.IGNORECASE)
    # every layer a method plugs into: a method's name, parameters or checkpoint layout lives in its own file
    files = [p for layer in ("distributed", "config", "training", "inference", "tracking")
             for p in (PACKAGE / layer).rglob("*.py")]
    hits = [f"{p.relative_to(PACKAGE)}:{i}: {line.strip()}" for p in files
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert hits == []


@pytest.mark.parametrize("sets, message", [
    (["params.num_cluster=10"], r"unknown parameter 'params.num_cluster' of method 'mmt'; valid names: .*params.num_clusters"),
    (["params.num_clusters=many"], r"params.num_clusters='many': expected int"),
    ({"params.num_clusters": 1.5}, r"params.num_clusters=1.5: expected int"),
    ({"params.two_sources": "maybe"}, r"params.two_sources='maybe': expected bool"),
    ({"params.alpha": [0.9]}, r"params.alpha=\[0.9\]: expected float"),
    ({"epochs": float("nan")}, r"epochs=nan: expected int"),
    (["params.cluster_algorithm=spectral"], r"params.cluster_algorithm='spectral'; valid: kmeans, dbscan"),
])
def test_method_parameters_are_typed(sets, message):
    with pytest.raises(ReidRayError, match=message):
        resolve_config("mmt", sets=sets)


def test_a_typo_in_a_config_file_is_an_error(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("method: ecn\nparams:\n  knn: 6\n")
    method, source, target, file = load_config_file(path)
    with pytest.raises(ReidRayError, match=r"'params.knn' of method 'ecn'; valid names: .*params.knn_k"):
        resolve_config(method, source, target, file=file)


def test_a_typo_in_a_flag_exits_2_before_ray(capsys):
    from reid_ray.cli.train import main

    assert main(["--method", "mmt", "--set", "params.num_cluster=10"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "valid names" in err and "params.num_clusters" in err


def test_one_precedence_list():
    # defaults < synthetic < the method's < preset < config file < flags < --set
    assert resolve_config("mmt").epochs == 10                                   # the method's synthetic override
    assert resolve_config("mmt", preset="duke2market").epochs == 40             # its paper recipe on the preset
    assert resolve_config("mmt", preset="duke2market", file={"epochs": 7}).epochs == 7
    assert resolve_config("mmt", preset="duke2market", file={"epochs": 7}, flags={"epochs": 5}).epochs == 5
    assert resolve_config("mmt", file={"epochs": 7}, flags={"epochs": 5}, sets=["epochs=3"]).epochs == 3
    sweep = resolve_config("mmt", sweep=True)
    assert sweep.epochs == 3 and sweep.params.two_sources is False           # the sweep layer of the demo
    assert resolve_config("mmt", preset="duke2market", sweep=True).params.two_sources is True


def test_dbscan_pseudo_labels_are_selectable_for_mmt(tiny_synth):
    import numpy as np
    import torch

    from reid_ray.clustering.client import LocalClusterer
    from reid_ray.data.readers import read_dataset
    from reid_ray.methods import METHODS, Domains, EpochContext
    from reid_ray.training.loop import train_epoch

    cfg = resolve_config("mmt", sets=["num_identities=4", "cluster_algorithm=dbscan", "eps=0.5", "min_samples=2", "k1=10",
                                 "iters=2"],
                         flags=dict(data_root=str(tiny_synth)))
    spec = METHODS["mmt"].cluster_spec(cfg)
    assert (spec.algorithm, spec.eps, spec.min_samples, spec.k1) == ("dbscan", 0.5, 2, 10)
    domains = Domains(read_dataset("synth-a", tiny_synth), read_dataset("synth-b", tiny_synth))
    method = METHODS["mmt"](cfg, domains, torch.device("cpu"))
    method.clusterer = LocalClusterer(spec, domains.target.train["pid"].to_numpy())
    method.setup()
    n = domains.target.train.num_rows
    assert method.models["net1"].classifier.weight.shape[0] == -(-n // 2)  # room for the most DBSCAN can find
    method.on_epoch_start(EpochContext(0))
    k, w = method.k, method.models["net1"].classifier.weight
    assert 0 < k < n and torch.allclose(w[:k].norm(dim=1), torch.ones(k), atol=1e-5) and not w[k:].any()
    out = train_epoch(method, EpochContext(0))
    assert out["pseudo_clusters"] == k and out["pseudo_outliers"] >= 0 and np.isfinite(out["loss"])
    assert not method.models["net1"].classifier.weight[k:].any()  # rows past this refresh's k stay unused
    with pytest.raises(ReidRayError, match="valid: kmeans, dbscan"):
        METHODS["mmt"].cluster_spec(resolve_config("mmt", sets=["cluster_algorithm=spectral"]))


class _Payload:
    """Stands for an object a malicious checkpoint would unpickle (and run code in)."""


@pytest.mark.parametrize("content, message", [
    ("unsafe", "refused by the safe checkpoint loader"),
    ("text", "not a checkpoint torch can read"),
    ("other-method", "a checkpoint of method 'mmt', not 'baseline'; pass --method mmt"),
])
def test_resume_checkpoints_load_safely_and_are_checked_before_ray(tmp_path, capsys, content, message):
    import torch

    from reid_ray.cli.train import main

    path = tmp_path / "checkpoint.pt"
    if content == "unsafe":
        torch.save({"method": _Payload()}, path)
    elif content == "text":
        path.write_text("not a checkpoint")
    else:
        torch.save({"method": {}, "config": {"method": "mmt"}}, path)
    assert main(["--method", "baseline", "--resume", str(path)]) == 2  # (without --method: the checkpoint's)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_a_method_declares_its_choices_and_they_are_checked_before_ray():
    with pytest.raises(ReidRayError, match=r"params.target_sampler='pkk'; valid: cross_camera, pk"):
        resolve_config("spcl", sets=["target_sampler=pkk"])


@pytest.mark.parametrize("epoch, expected", [(1, ("KILLED", "stopped by ASHA")), (2, ("FINISHED", "completed"))])
def test_a_trial_that_tune_stops_gets_its_run_closed(tmp_path, epoch, expected):
    from types import SimpleNamespace

    from mlflow.tracking import MlflowClient

    from reid_ray import tracking
    from reid_ray.distributed.sweep import CloseStoppedRuns

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = tracking.open_run(uri, "exp", "key", "trial-run", {}, {"trial_id": "t1"}, {})
    other = tracking.open_run(uri, "exp", "key2", "other", {}, {"trial_id": "t2"}, {})
    # ASHA stops t1 after `epoch` of 2 epochs (at the last one too: a rung can fall on max_t)
    CloseStoppedRuns(uri, "exp", epochs=2).on_trial_complete(0, [], SimpleNamespace(trial_id="t1",
                                                                                   last_result={"epoch": epoch}))
    run = MlflowClient(uri).get_run(run_id)
    assert (run.info.status, run.data.tags["status"]) == expected
    assert MlflowClient(uri).get_run(other).info.status == "RUNNING"  # only that trial's run


def test_a_wheel_carries_the_search_spaces(tmp_path):
    """`reid-ray tune` reads search_spaces/<method>.yaml: a non-editable install has only what the wheel holds."""
    import shutil
    import subprocess
    import sys
    import zipfile

    root = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "reid_ray", "search_spaces"):
        copy = shutil.copytree if (root / name).is_dir() else shutil.copy2
        kw = {"symlinks": True, "ignore": shutil.ignore_patterns("__pycache__")} if copy is shutil.copytree else {}
        copy(root / name, src / name, **kw)
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist")], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("reid_ray-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"reid_ray/search_spaces/{p.relative_to(root / 'search_spaces')}" for p in (root / "search_spaces").rglob("*.yaml")}
    assert shipped and shipped <= names, sorted(shipped - names)
    packages = {f"{p.relative_to(root).as_posix()}" for p in PACKAGE.rglob("__init__.py")}
    assert packages <= names, sorted(packages - names)  # every layer's package
    assert not any(n.startswith("tests/") or n.endswith("mlflow_ui.py") for n in names)  # test tools stay out
    # installed from the wheel alone (not this checkout) and run from another folder: a sweep finds its space
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target),
                    str(wheel)], check=True, capture_output=True, timeout=300)
    (tmp_path / "elsewhere").mkdir()
    probe = ("import reid_ray; from reid_ray.cli.tune import build_parser, prepare_sweep; "
             "s = prepare_sweep(build_parser().parse_args(['--method', 'mmt', '--output', 'out'])); "
             "print(reid_ray.__file__); print(s.space_path)")
    out = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(target)!r}); {probe}"],
                         cwd=tmp_path / "elsewhere", capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    module, space = out.stdout.split()
    assert module.startswith(str(target)) and Path(space).is_file() and Path(space).is_relative_to(target), out.stdout


def test_a_runs_status_is_decided_in_one_module():
    """Rank 0 writes its own run's status through its RunWriter; every other status write is a rule of
    tracking/status.py (the driver's and the sweep's closes, ASHA's stops), never an ad hoc MLflow call."""
    writes = re.compile(r"\b(set_terminated|update_run|set_status|end_run)\(")
    owners = {PACKAGE / "tracking" / "runs.py", PACKAGE / "tracking" / "status.py"}
    hits = [f"{p.relative_to(PACKAGE)}:{i}: {line.strip()}" for p in PACKAGE.rglob("*.py") if p not in owners
            for i, line in enumerate(p.read_text().splitlines(), 1)
            if writes.search(line) and not line.strip().startswith("run.set_status(")]  # rank 0's RunWriter
    assert hits == []
