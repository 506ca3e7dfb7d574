"""reid-ray export / embed / evaluate: a checkpoint's retrieval network out of the platform, checked against
torch's own evaluation path. The checkpoints are made in-process in the format the workers write (untrained
networks with random BatchNorm statistics, so the BN feature is not trivial); no Ray."""

from __future__ import annotations

import hashlib
import math
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from reid_ray import ReidRayError
from reid_ray.cli.export import main_embed, main_evaluate, main_export
from reid_ray.config import resolve_config, to_dict
from reid_ray.data.loader import ImageDataset
from reid_ray.data.readers import read_dataset
from reid_ray.data.transforms import test_transform as eval_transform
from reid_ray.inference.embedder import load_embedder
from reid_ray.inference.evaluate import evaluate_checkpoint
from reid_ray.inference.parquet import list_images
from reid_ray.methods import METHODS, Domains
from reid_ray.training.loop import evaluate_model, rng_state


def _randomise_bn(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)


def _save(method, cfg, path: Path, **extra) -> Path:
    """A checkpoint as distributed/worker.py writes it."""
    state = {"method": method.state_dict(), "epoch": 0, "best": {}, "iteration": 0, "last_target": float("nan"),
             "rng": rng_state(), "config": to_dict(cfg), "report": {}, **extra}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def domains(tiny_synth):
    return Domains(read_dataset("synth-a", tiny_synth, use_cache=False), read_dataset("synth-b", tiny_synth, use_cache=False))


@pytest.fixture(scope="module")
def baseline(tiny_synth, domains, tmp_path_factory):
    """(checkpoint folder, the method, its config): the synthetic defaults' small ResNet at 64x32."""
    cfg = resolve_config("baseline", sets=["num_identities=4"], flags=dict(data_root=str(tiny_synth)))
    method = METHODS["baseline"](cfg, domains, torch.device("cpu"))
    method.setup()
    with torch.no_grad():
        _randomise_bn(method.eval_model(), 0)
    folder = tmp_path_factory.mktemp("run") / "checkpoint_000000"
    _save(method, cfg, folder / "checkpoint.pt")
    return folder, method, cfg


def _reference(method, images: torch.Tensor) -> np.ndarray:
    """What evaluation computes: the method's eval network in eval mode, L2-normalised (extract_features)."""
    net = method.eval_model().eval()
    with torch.no_grad():
        return F.normalize(net(images), dim=1).numpy()


def _images(folder: Path, cfg, n: int | None = None) -> tuple[list[Path], torch.Tensor]:
    _, files = list_images(folder)
    files = files[:n] if n else files
    t = eval_transform(cfg.transform)
    return files, torch.stack([t(ImageDataset._load(str(f))) for f in files])


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("reid-ray: error: "), err
    return err


def test_commands_are_exposed_for_the_cli():
    import importlib

    from reid_ray.cli import FORWARDED

    commands = {name: (getattr(importlib.import_module(module), fn), h) for name, (module, fn, h) in FORWARDED.items()
                if module == "reid_ray.cli.export"}
    assert set(commands) == {"export", "embed", "evaluate"}
    assert commands["export"][0] is main_export and commands["embed"][0] is main_embed
    assert commands["evaluate"][0] is main_evaluate
    assert all(isinstance(h, str) and h and "\n" not in h for _, h in commands.values())
    with pytest.raises(SystemExit) as e:
        main_export(["--help"])
    assert e.value.code == 0


def test_onnx_equals_torch_at_two_batch_sizes(baseline, tiny_synth, tmp_path, capfd):
    import onnx

    from reid_ray.inference.onnx import onnx_session

    folder, method, cfg = baseline
    out = tmp_path / "embedder.onnx"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        assert main_export(["--checkpoint", str(folder), "--onnx", str(out)]) == 0
    std = capfd.readouterr()
    assert std.err == "" and "warn" not in std.out.lower() and [str(w.message) for w in caught] == []
    assert "wrote" in std.out and "dynamo exporter" in std.out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["embedder.onnx"]  # atomic: no temp file left

    model = onnx.load(str(out))
    props = {p.key: p.value for p in model.metadata_props}
    assert props["model_digest"] == hashlib.sha256((folder / "checkpoint.pt").read_bytes()).hexdigest()
    assert (props["height"], props["width"], props["mean"]) == ("64", "32", "0.485,0.456,0.406")
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 64, 32]  # a dynamic batch axis

    session = onnx_session(out)
    _, images = _images(tiny_synth / "synth-b" / "query", cfg)
    for batch in (1, 7):  # two batch sizes through one graph
        x = images[:batch]
        got = session.run(["features"], {"images": x.numpy()})[0]
        want = _reference(method, x)
        assert got.shape == (batch, 256)
        np.testing.assert_allclose(got, want, atol=1e-4)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)


def test_embed_writes_features_that_match_torch(baseline, tiny_synth, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder, method, cfg = baseline
    images = tmp_path / "photos"
    (images / "b").mkdir(parents=True)
    files, x = _images(tiny_synth / "synth-a" / "query", cfg, n=9)
    for i, f in enumerate(files):  # nested folders and upper-case suffixes are found too
        (images / ("b" if i % 2 else "") / (f.stem + (".JPG" if i == 3 else f.suffix))).write_bytes(f.read_bytes())
    png = tiny_synth / "synth-a" / "texture"
    png_file = sorted(png.iterdir())[0]
    (images / "z.png").write_bytes(png_file.read_bytes())
    (images / "notes.txt").write_text("not an image")
    out = tmp_path / "feats.parquet"
    assert main_embed(["--checkpoint", str(folder / "checkpoint.pt"), "--images", f"folder:{images}", "--out",
                       str(out), "--batch-size", "4", "--device", "cpu"]) == 0  # --target's spelling, or a plain path
    assert "10 images x 256 features" in capsys.readouterr().out

    table = pq.read_table(out)
    assert table.schema.field("path").type == pa.string()
    assert table.schema.field("feature").type == pa.list_(pa.float32(), 256)
    digest = hashlib.sha256((folder / "checkpoint.pt").read_bytes()).hexdigest()
    assert table.schema.metadata[b"model_digest"].decode() == digest
    assert set(table["model_digest"].to_pylist()) == {digest}
    paths = table["path"].to_pylist()
    assert paths == sorted(paths) and len(paths) == 10 and "z.png" in paths and "notes.txt" not in paths
    feats = np.asarray(table["feature"].to_pylist(), dtype=np.float32)
    by_name = {Path(p).stem: i for i, p in enumerate(paths)}
    want = _reference(method, x)
    got = feats[[by_name[f.stem] for f in files]]
    np.testing.assert_allclose(got, want, atol=1e-5)
    tex = eval_transform(cfg.transform)(ImageDataset._load(str(png_file)))[None]
    np.testing.assert_allclose(feats[by_name["z"]], _reference(method, tex)[0], atol=1e-5)


def test_evaluate_prints_what_engine_evaluate_model_gives(baseline, tiny_synth, domains, capsys):
    folder, method, cfg = baseline
    assert main_evaluate(["--checkpoint", str(folder), "--dataset", "synth-b", "--data-root", str(tiny_synth),
                          "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    want = evaluate_model(method.eval_model(), domains.target, cfg, torch.device("cpu"))
    for col in ("mAP", "R1", "R5", "R10"):
        assert col in out
    row = next(line for line in out.splitlines() if "plain" in line)
    assert [float(v) for v in re.findall(r"\d+\.\d", row)] == [round(want[k], 1) for k in ("mAP", "R1", "R5", "R10")]

    emb = load_embedder(folder)
    res = evaluate_checkpoint(emb, "synth-b", tiny_synth, rerank=True)
    for k in ("mAP", "R1", "R5", "R10"):
        assert math.isclose(res["plain"][k], want[k], abs_tol=1e-6)
        assert 0 <= res["rerank"][k] <= 100
    np.testing.assert_allclose(res["plain"]["cmc"], want["cmc"], atol=1e-6)

    assert main_evaluate(["--checkpoint", str(folder), "--dataset", "synth-b", "--data-root", str(tiny_synth),
                          "--rerank", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if "re-ranked" in line)
    assert [float(v) for v in re.findall(r"\d+\.\d", row.split(")")[-1])] == [
        round(res["rerank"][k], 1) for k in ("mAP", "R1", "R5", "R10")]


def test_evaluate_visualize_draws_ranked_lists_labelled_or_not(baseline, tiny_synth, tmp_path, capsys):
    """`reid-ray evaluate --visualize N`: on a dataset with identities, the ranked lists beside its mAP; on a
    folder of unlabelled images (`folder:PATH`), the ranked lists alone and no mAP."""
    from PIL import Image

    from tests.test_folder_target import unlabelled_copy

    folder, _method, _cfg = baseline
    out = tmp_path / "ranked.png"
    assert main_evaluate(["--checkpoint", str(folder), "--dataset", "synth-b", "--data-root", str(tiny_synth),
                          "--device", "cpu", "--visualize", "4", "--visualize-out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "mAP" in text and f"wrote {out} (4 queries' ranked lists)" in text and Image.open(out).format == "PNG"
    crops = unlabelled_copy(tiny_synth, tmp_path / "crops")
    plain = tmp_path / "plain.png"
    assert main_evaluate(["--checkpoint", str(folder), "--dataset", f"folder:{crops}",  # no --data-root
                          "--device", "cpu", "--visualize", "3", "--visualize-out", str(plain)]) == 0
    text = capsys.readouterr().out
    assert "unlabelled images" in text and "no mAP" in text and "R1" not in text
    assert Image.open(plain).format == "PNG"


def test_a_multi_network_checkpoint_exports_the_network_evaluation_reports(tiny_synth, domains, tmp_path, capsys):
    cfg = resolve_config("mmt", sets=["num_identities=4", "num_clusters=8"], flags=dict(data_root=str(tiny_synth)))
    method = METHODS["mmt"](cfg, domains, torch.device("cpu"))
    method.setup()
    with torch.no_grad():
        for i, ema in enumerate(method.emas):
            _randomise_bn(ema, 10 + i)
    path = _save(method, cfg, tmp_path / "checkpoint.pt",
                 report={"target_mAP": 20.0, "target_mAP_mean_net1": 10.0, "target_mAP_mean_net2": 20.0})
    emb = load_embedder(path)  # mean net 1, the one evaluation reports, though the report scores net 2 higher
    assert emb.method == "mmt" and emb.network == "mean_net1"
    assert set(emb.networks) == {"mean_net1", "mean_net2", "net1", "net2"}
    x = torch.randn(3, 3, 64, 32)
    with torch.no_grad():
        torch.testing.assert_close(emb.net(x), method.emas[0].eval()(x))
        assert not torch.allclose(emb.net(x), method.emas[1].eval()(x))
        assert load_embedder(path, net="net1").network == "net1"
    assert main_export(["--checkpoint", str(path), "--onnx", str(tmp_path / "m.onnx"), "--net", "student"]) == 2
    err = _one_error_line(capsys)
    assert "--net student" in err and "mean_net1, mean_net2, net1, net2" in err


def test_a_wrapped_network_is_found_under_its_name(baseline):
    import copy

    from reid_ray.models.ecn_net import ECNNet

    _, method, _ = baseline
    net = method.eval_model().state_dict()
    wrapper = ECNNet(copy.deepcopy(method.eval_model()), 8, 0.5, False, torch.device("cpu"))  # its ReIDNet under net.
    nets = METHODS["ecn"].retrieval_networks({"models": {"net": wrapper.state_dict()}, "memory": {}})
    evaluated = list(nets)[:1]
    assert list(nets) == ["net"] and evaluated == ["net"] and nets["net"].keys() == net.keys()
    assert all(torch.equal(nets["net"][k], v) for k, v in net.items())
    # a decoder beside the network (the default layout's `net`) is no retrieval network
    with_decoder = {"models": {"net": net, "decoder": {"head.weight": torch.zeros(1)}}}
    assert list(METHODS["san"].retrieval_networks(with_decoder)) == ["net"]
    with pytest.raises(ReidRayError, match=r"no method\.models\.net \(method\.models holds decoder\)"):
        METHODS["baseline"].retrieval_networks({"models": {"decoder": {}}})


def test_the_network_names_come_from_the_method(tiny_synth, domains, tmp_path):
    cfg = resolve_config("mmt", sets=["num_identities=4", "num_clusters=8"], flags=dict(data_root=str(tiny_synth)))
    method = METHODS["mmt"](cfg, domains, torch.device("cpu"))
    method.setup()
    with torch.no_grad():
        for i, ema in enumerate(method.emas):
            _randomise_bn(ema, 20 + i)
    state = method.state_dict()
    nets = METHODS["mmt"].retrieval_networks(state)
    assert list(nets) == [*method.eval_models(), "net1", "net2"] == ["mean_net1", "mean_net2", "net1", "net2"]
    for name, ema in method.eval_models().items():  # the mean nets' own tensors, not the trained nets'
        want = ema.state_dict()
        assert nets[name].keys() == want.keys() and all(torch.equal(nets[name][k], v) for k, v in want.items())
    assert all(torch.equal(nets["mean_net1"][k], v) for k, v in method.eval_model().state_dict().items())
    assert not torch.equal(nets["mean_net1"]["bnneck.running_mean"], nets["net1"]["bnneck.running_mean"])

    # a layout the method does not write: one clear error, from the method and from the command alike
    with pytest.raises(ReidRayError, match=r"no method\.emas \(method holds models\)"):
        METHODS["mmt"].retrieval_networks({"models": {"net": {}}})
    with pytest.raises(ReidRayError, match=r"no method\.models\.net \(method\.models holds net1, net2\)"):
        METHODS["baseline"].retrieval_networks(state)
    path = _save(method, cfg, tmp_path / "mislabelled.pt", config={**to_dict(cfg), "method": "baseline"})
    with pytest.raises(ReidRayError, match=r"mislabelled.pt: not the layout a baseline checkpoint has: no "
                                           r"method\.models\.net \(method\.models holds net1, net2\)"):
        load_embedder(path)
    path = _save(method, cfg, tmp_path / "unknown.pt", config={**to_dict(cfg), "method": "mine"})
    with pytest.raises(ReidRayError, match=r"unknown.pt: written by unknown method 'mine'; valid: .*REID_RAY_METHODS"):
        load_embedder(path)
    path = _save(method, cfg, tmp_path / "no-config.pt", config=None)
    with pytest.raises(ReidRayError, match=r"no-config.pt: a reid-ray checkpoint without its config"):
        load_embedder(path)


def test_the_torchscript_exporter_takes_over_when_the_new_one_fails(baseline, tmp_path, monkeypatch, capfd):
    from reid_ray.inference.onnx import export_onnx, onnx_session

    folder, method, cfg = baseline
    real = torch.onnx.export

    def no_dynamo(*args, dynamo=True, **kw):
        if dynamo:
            print("[torch.onnx] pretending to fail")
            raise RuntimeError("unsupported operator")
        return real(*args, dynamo=dynamo, **kw)

    monkeypatch.setattr(torch.onnx, "export", no_dynamo)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        res = export_onnx(load_embedder(folder), tmp_path / "ts.onnx")
    assert res["exporter"] == "torchscript" and res["max_abs_diff"] < 1e-4
    assert [str(w.message) for w in caught] == [] and capfd.readouterr() == ("", "")
    x = torch.randn(5, 3, 64, 32)
    got = onnx_session(tmp_path / "ts.onnx").run(["features"], {"images": x.numpy()})[0]
    np.testing.assert_allclose(got, _reference(method, x), atol=1e-4)


def _bad_image_folder(root: Path) -> Path:
    folder = root / "bad"
    folder.mkdir()
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return folder


@pytest.mark.parametrize("case", ["missing checkpoint", "not a checkpoint", "no images", "unreadable image",
                                  "unknown dataset", "no onnxruntime"])
def test_bad_input_is_one_line_and_exit_2(case, baseline, tiny_synth, tmp_path, capsys, monkeypatch):
    folder, _, _ = baseline
    ckpt = str(folder)
    if case == "missing checkpoint":
        rc = main_export(["--checkpoint", str(tmp_path / "nope.pt"), "--onnx", str(tmp_path / "m.onnx")])
        expect = ["nope.pt", "no such file", "checkpoint.pt"]
    elif case == "not a checkpoint":
        torch.save({"state_dict": {}}, tmp_path / "other.pt")  # a torch file, not reid-ray's
        assert main_export(["--checkpoint", str(tmp_path / "other.pt"), "--onnx", str(tmp_path / "m.onnx")]) == 2
        assert "not a reid-ray checkpoint" in _one_error_line(capsys)
        (tmp_path / "weights.pt").write_text("hello")
        rc = main_embed(["--checkpoint", str(tmp_path / "weights.pt"), "--images", str(tiny_synth / "synth-a" / "query"),
                         "--out", str(tmp_path / "f.parquet")])
        expect = ["weights.pt", "not a checkpoint", "checkpoint.pt"]
    elif case == "no images":
        (tmp_path / "empty" / "sub").mkdir(parents=True)
        (tmp_path / "empty" / "sub" / "readme.txt").write_text("x")
        rc = main_embed(["--checkpoint", ckpt, "--images", str(tmp_path / "empty"), "--out", str(tmp_path / "f.parquet")])
        expect = ["empty", "no .jpg, .jpeg or .png images"]
    elif case == "unreadable image":
        rc = main_embed(["--checkpoint", ckpt, "--images", str(_bad_image_folder(tmp_path)),
                         "--out", str(tmp_path / "f.parquet"), "--device", "cpu"])
        expect = ["broken.jpg", "not a readable image", "replace or delete"]
    elif case == "unknown dataset":
        rc = main_evaluate(["--checkpoint", ckpt, "--dataset", "market1502", "--data-root", str(tiny_synth)])
        expect = ["market1502", "valid names", "market1501"]
    else:
        monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime: ImportError
        rc = main_export(["--checkpoint", ckpt, "--onnx", str(tmp_path / "m.onnx")])
        expect = ["onnxruntime", "pip install -e '.[export]'"]
    assert rc == 2
    err = _one_error_line(capsys)
    assert all(e in err for e in expect), err
    assert not list(tmp_path.glob("*.parquet")) and not list(tmp_path.glob("*.onnx"))  # nothing half-written


def test_a_network_without_its_classifier_is_found_and_embeds(tmp_path):
    """SpCL classifies against its memory: its checkpoint's network has a BNNeck and no classifier."""
    from reid_ray.config import resolve_config, to_dict
    from reid_ray.models.reid_net import build_reid_net

    cfg = resolve_config("spcl")
    torch.manual_seed(0)
    net = build_reid_net(cfg.model, 5).eval()
    net.classifier = torch.nn.Identity()
    torch.save({"method": {"models": {"net": net.state_dict()}}, "config": to_dict(cfg)}, tmp_path / "c.pt")
    emb = load_embedder(tmp_path / "c.pt")
    x = torch.rand(2, 3, *emb.size)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(net(x), dim=1)
        assert emb.network == "net" and torch.allclose(emb.module(x), expected, atol=1e-6)
