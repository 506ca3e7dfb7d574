"""A user's own unlabelled images as the target (`--target folder:PATH`): how a folder is read (cameras from
sub-folders, file names or none), the config it resolves to, and a run under Ray Train on a folder of the embedded
target's images with no labels in their names, which ranks on a label-free score and reports no target mAP."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image

from reid_ray import ReidRayError
from reid_ray.config import resolve_config
from reid_ray.data.folder import folder_cameras
from reid_ray.data.layouts import parse_market_name
from reid_ray.data.readers import read_folder


def unlabelled_copy(dataset_root: Path, out: Path, *, by_camera: bool = True) -> Path:
    """The training images of synth-b under `dataset_root`, copied to `out` with no identity in their names:
    one sub-folder per camera (`cam1/`, ...), or all in one folder with names that carry no camera."""
    out.mkdir(parents=True)
    for i, f in enumerate(sorted((dataset_root / "synth-b" / "bounding_box_train").iterdir())):
        _pid, cam = parse_market_name(f.name)
        folder = out / f"cam{cam + 1}" if by_camera else out
        folder.mkdir(exist_ok=True)
        shutil.copy(f, folder / f"frame{(i * 7919) % 100003:06d}{f.suffix}")
    return out


def crops(folder: Path, n: int, broken: int = 0, dangling: int = 0) -> Path:
    """`n` small person-sized PNGs in `folder` (two camera sub-folders), `broken` files that are not images and
    `dangling` links to files that do not exist."""
    for i in range(n):
        d = folder / f"cam{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 32), (i * 37 % 255, i * 91 % 255, 90)).save(d / f"p{i:03d}.png")
    for i in range(broken):
        (folder / "cam0" / f"broken{i}.jpg").write_bytes(b"not a jpeg")
    for i in range(dangling):
        (folder / "cam1" / f"gone{i}.png").symlink_to(folder / "elsewhere" / f"gone{i}.png")
    return folder


def test_cameras_come_from_sub_folders_then_file_names_then_one_camera():
    assert folder_cameras(["north/a.jpg", "south/b.jpg", "north/c.jpg"]) == ([0, 1, 0], "sub-folders")
    # Market-style tokens: c<N> at the start or after _ or -, before _, -, s or the extension
    names = ["0001_c3s1_000451.jpg", "x-c1-7.png", "c2_9.jpg", "frame_c10.jpg"]
    assert folder_cameras(names) == ([2, 0, 1, 3], "file names")  # cameras 1, 2, 3, 10 in numeric order
    assert folder_cameras(["a.jpg", "b_c2.jpg"]) == ([0, 0], "none")  # not every name has one: one camera
    assert folder_cameras(["only/a.jpg", "only/b.jpg"]) == ([0, 0], "none")  # one sub-folder is not cameras


def test_a_folder_reads_as_an_unlabelled_target_with_no_query_or_gallery(tmp_path):
    crops(tmp_path / "cams", 6)
    ds = read_folder(f"folder:{tmp_path / 'cams'}")
    assert not ds.labelled and ds.cameras_from == "sub-folders"
    assert ds.train.num_rows == 6 and ds.query.num_rows == ds.gallery.num_rows == 0
    assert set(ds.train["pid"].to_pylist()) == {-1} and sorted(set(ds.train["camid"].to_pylist())) == [0, 1]
    assert "6 unlabelled images, 2 camera(s) (from sub-folders)" in str(ds)
    (tmp_path / "cams" / "cam1" / "new.png").write_bytes((tmp_path / "cams" / "cam0" / "p000.png").read_bytes())
    assert read_folder(f"folder:{tmp_path / 'cams'}").train.num_rows == 7  # the cache follows the folder


def test_a_folder_target_resolves_with_its_path_absolute_and_a_label_free_metric(tmp_path, monkeypatch):
    crops(tmp_path / "Crops", 4)
    monkeypatch.chdir(tmp_path)
    cfg = resolve_config("mmt", target="folder:Crops")
    assert cfg.target == f"folder:{tmp_path / 'Crops'}"  # absolute, its case kept, for every Ray worker
    assert cfg.experiment_name == "synth-a->folder:Crops" and cfg.model.arch == "small"  # the embedded source's scale
    assert not cfg.target_labelled and cfg.selection_metric == "target_sharpness"
    assert cfg.scores == ("source_val_mAP", "target_probe", "target_sharpness")
    assert resolve_config("spcl", "none", "folder:Crops").scores == ("target_probe", "target_sharpness")
    assert resolve_config("mmt", target="folder:Crops", sets=["metric=source_val_mAP"]).selection_metric == "source_val_mAP"
    assert resolve_config("mmt").selection_metric == "target_mAP"  # a published target keeps its mAP
    assert resolve_config("mmt", sets=["metric=target_probe"]).selection_metric == "target_probe"
    with pytest.raises(ReidRayError, match="needs target labels"):
        resolve_config("mmt", target="folder:Crops", sets=["metric=target_mAP"])
    with pytest.raises(ReidRayError, match="only be the target"):
        resolve_config("mmt", source="folder:Crops")


def test_one_camera_warns_once_naming_what_each_part_loses(tmp_path, capsys):
    from reid_ray.data.domains import Domains
    from reid_ray.distributed.driver import warn_lost_parts

    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(4):
        Image.new("RGB", (16, 32)).save(flat / f"{i}.png")
    domains = Domains(None, read_folder(f"folder:{flat}"))
    warn_lost_parts(resolve_config("mar", target=f"folder:{flat}"), domains)
    line = capsys.readouterr().out.strip()
    assert line.startswith("reid-ray: warning: folder:flat has one camera (no camera sub-folders, no c<N>")
    assert "the cross-view term (CML" in line and "\n" not in line
    warn_lost_parts(resolve_config("baseline", target=f"folder:{flat}"), domains)  # nothing camera-aware: silent
    assert capsys.readouterr().out == ""
    # ECN samples no cameras, but a folder has no CamStyle images: its camera-invariance term is lost
    warn_lost_parts(resolve_config("ecn", target=f"folder:{flat}"), domains)
    line = capsys.readouterr().out.strip()
    assert line.startswith("reid-ray: warning: folder:flat has no CamStyle images (camstyle/")
    assert "without its camera-invariance term" in line and "\n" not in line


@pytest.mark.ray
def test_mmt_trains_under_ray_on_an_unlabelled_folder_and_ranks_on_a_label_free_score(tiny_synth, tmp_path):
    """`python -m reid_ray.train --method mmt --target folder:...` on the embedded target's images without their
    labels: it trains, ranks best.pt on the target-only mixup probe and says so, logs the label-free scores every
    evaluation, and has no target mAP anywhere (console, MLflow)."""
    from mlflow.tracking import MlflowClient

    from tests.conftest import run_cli, seed_source_models

    folder = unlabelled_copy(tiny_synth, tmp_path / "crops")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sets = ["num_identities=4", "params.num_clusters=12", "params.iters=4", "log_model=false", "warmup_epochs=1"]
    seed_source_models(resolve_config("mmt", target=f"folder:{folder}", sets=sets,
                                      flags=dict(data_root=str(tiny_synth), output=str(tmp_path / "out"))))
    proc = run_cli(["-m", "reid_ray.train", "--method", "mmt", "--target", f"folder:{folder}", "--data-root",
                    str(tiny_synth), "--epochs", "2", "--eval-every", "1", "--output", str(tmp_path / "out"),
                    "--mlflow-uri", uri, "--name", "crops", *[a for s in sets for a in ("--set", s)]], tmp_path)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    assert "source model: training" not in text, text  # the seeded source model
    assert "target sharpness (label-free, %) (ranked on)" in proc.stdout, proc.stdout
    assert "target mixup probe (label-free, %)" in proc.stdout
    assert "folder:crops has no labels: best.pt is the epoch with the best target_sharpness" in proc.stdout
    assert "target mAP" not in text and "warning" not in text.lower()
    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("synth-a->folder:crops").experiment_id])[0]
    assert run.info.status == "FINISHED" and run.data.tags["selection_metric"] == "target_sharpness"
    metrics = run.data.metrics
    assert {"source_val_mAP", "target_probe", "target_sharpness", "target_snd", "target_mean_cosine",
            "target_effective_rank", "pseudo_silhouette"} <= set(metrics)  # the diagnostics: logged, never ranked on
    assert not [k for k in metrics if k.startswith("target_mAP") or k in ("target_R1", "nmi", "cluster_purity")]
    assert len(client.get_metric_history(run.info.run_id, "source_val_mAP")) == 2  # every evaluation
    assert all(0 <= metrics[k] <= 100 for k in ("target_probe", "target_sharpness", "source_val_mAP"))
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["synth-a", f"folder:{folder}"]
    # the pictures: each refresh's clusters, and the final network's ranked lists (plain: no labels)
    artifacts = {f.path for d in ("epoch1", "epoch2") for f in client.list_artifacts(run.info.run_id, d)}
    assert {"epoch1/clusters.png", "epoch2/clusters.png", "epoch2/ranked_lists.png"} <= artifacts, artifacts
    local = Path(client.download_artifacts(run.info.run_id, "epoch2/ranked_lists.png", str(tmp_path)))
    assert Image.open(local).format == "PNG"


@pytest.mark.ray
@pytest.mark.budget(150)
def test_a_sweep_on_an_unlabelled_folder_ranks_on_a_label_free_score_and_says_so(tiny_synth, tmp_path):
    """`python -m reid_ray.tune --method mmt --target folder:...`: ASHA, Optuna and the final pick rank on the
    target-only neighbourhood sharpness; the table, summary.md and MLflow name it, show no target mAP, and the trials' ensemble
    agreement stands beside it."""
    from mlflow.tracking import MlflowClient

    from tests.conftest import run_cli, seed_sweep_source_models

    folder = unlabelled_copy(tiny_synth, tmp_path / "crops", by_camera=False)
    space = tmp_path / "space.yaml"
    space.write_text("params:\n  optim.lr: {distribution: loguniform, low: 1.0e-4, high: 1.0e-3}\n"
                     "fixed:\n  loader.num_identities: 4\n  params.num_clusters: 12\n  params.iters: 3\n"
                     "  pretrain_epochs: 1\n  log_model: false\n")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["-m", "reid_ray.tune", "--method", "mmt", "--target", f"folder:{folder}", "--data-root", str(tiny_synth),
            "--search-space", str(space), "--num-samples", "2", "--epochs", "1", "--output", str(tmp_path / "out"),
            "--mlflow-uri", uri, "--name", "crops"]
    seed_sweep_source_models(argv)
    proc = run_cli(argv, tmp_path)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    assert "ranked on target_sharpness" in proc.stdout and "target mAP" not in text
    # one camera (no sub-folders, no c<N> names): MMT's cross-camera sampler falls back, said once
    assert text.count("reid-ray: warning: folder:crops has one camera") == 1
    summary = (tmp_path / "out" / "tune" / "crops" / "summary.md").read_text()
    assert "ranked by `target_sharpness`" in summary and "the target has no labels, so there is no target mAP" in summary
    assert "| target_sharpness (ranked on) | ensemble agreement |" in summary and "target mAP |" not in summary
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("synth-a->folder:crops").experiment_id])
    parent = next(r for r in runs if r.data.tags.get("sweep_parent") == "true")
    assert "best_target_sharpness" in parent.data.metrics and "best_target_mAP" not in parent.data.metrics
    trials = [r for r in runs if r.data.tags.get("trial_id")]
    assert len(trials) == 2 and all("ensemble_agreement" in r.data.metrics for r in trials)
    assert all(0 <= r.data.metrics["ensemble_agreement"] <= 100 for r in trials)


def test_the_label_free_scores_leave_torch_rng_as_they_found_it(tiny_synth):
    """Their loaders draw seeds from torch's generator, and a resumed run decodes the probe pool again: restoring the
    generator keeps a run's batches the same with the scores on or off, and a resumed run equal to a calm one."""
    import torch

    from reid_ray.data.domains import load_domains
    from reid_ray.methods import METHODS
    from reid_ray.training.label_free import _POOLS, label_free_scores

    cfg = resolve_config("baseline", flags=dict(data_root=str(tiny_synth)), sets=["num_identities=4"])
    domains = load_domains(cfg.source, cfg.target, cfg.data_root)
    method = METHODS["baseline"](cfg, domains, torch.device("cpu"))
    method.setup()
    scores = []
    for _ in range(2):
        _POOLS.clear()  # as in a new process
        before = torch.get_rng_state()
        scores.append(label_free_scores(method.eval_model(), domains.source, domains.target, cfg, torch.device("cpu")))
        assert torch.equal(before, torch.get_rng_state())
    assert scores[0] == scores[1] and {"source_val_mAP", "target_probe"} <= set(scores[0])


def test_the_adabn_bar_is_cached_per_target_in_the_source_models_sidecar(tiny_synth, tmp_path, monkeypatch):
    """A source model adapted to a labelled target and to an image folder has two AdaBN figures, each kept in its
    sidecar under its own target (the folder's has no mAP); asked again, each comes from the sidecar."""
    import json

    from reid_ray.distributed import driver
    from tests.conftest import seed_source_models

    folder = unlabelled_copy(tiny_synth, tmp_path / "crops")
    sets = ["num_identities=4", "label_free.probe_images=16", "label_free.source_val_ids=4"]
    flags = dict(data_root=str(tiny_synth), output=str(tmp_path / "out"))
    labelled, unlabelled = (resolve_config("baseline", target=t, sets=sets, flags=flags)
                            for t in ("synth-b", f"folder:{folder}"))
    (init,) = seed_source_models(resolve_config("mmt", sets=sets, flags=flags), count=1)
    on_b, on_folder = driver.adabn_metrics(str(init), labelled), driver.adabn_metrics(str(init), unlabelled)
    assert "target_mAP" in on_b and "target_mAP" not in on_folder and "target_probe" in on_folder
    by_target = json.loads(init.with_suffix(".json").read_text())["adabn"]
    assert sorted(by_target) == sorted([f"synth-b in {tiny_synth.resolve()}", f"folder:{folder} in {folder.resolve()}"])
    monkeypatch.setattr("reid_ray.models.adabn.adapt_bn", lambda *a: pytest.fail("not read from the sidecar"))
    assert driver.adabn_metrics(str(init), labelled) == on_b
    assert driver.adabn_metrics(str(init), unlabelled) == on_folder
