"""SAN and SAN-PG: the decoder, its losses, texture lookup, the generator CLI, and one Ray run."""

import math

import pyarrow as pa
import pytest
import torch

from reid_ray import ReidRayError
from reid_ray.data.readers import ReIDDataset, read_dataset
from reid_ray.data.texture import texture_folder, texture_paths
from reid_ray.losses.san import DecoderTripletLoss, reconstruction_loss
from reid_ray.models.reid_net import ModelConfig, build_reid_net
from reid_ray.models.san_decoder import build_san_model, num_params


def small_san(size=(32, 32)):
    torch.manual_seed(0)
    return build_san_model(build_reid_net(ModelConfig(arch="small", sync_bn=False), 5), size)


def test_decoder_shape_range_skips_and_size():
    model = small_san((32, 16)).eval()
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        out = model(x)
        assert out["texture"].shape == (2, 3, 32, 16) and out["feat"].shape == (2, 256)
        assert [f.shape[1] for f in out["dec_feats"]] == model.decoder.block_dims
        lo = (0 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
        assert (out["texture"] >= lo.view(1, 3, 1, 1) - 1e-5).all()  # in the normalised images' range
        for skip in model.decoder.skips:  # every U-Net skip reaches the output
            w, b = skip.weight.clone(), skip.bias.clone()
            skip.weight.zero_(), skip.bias.zero_()
            assert not torch.allclose(model(x)["texture"], out["texture"])
            skip.weight.copy_(w), skip.bias.copy_(b)
    ratio = num_params(model.decoder) / num_params(model.net.backbone)
    assert 0.25 < ratio < 0.45, ratio  # the paper: about a third of the encoder


def test_reconstruction_and_decoder_triplet_losses_by_hand():
    pred, target = torch.zeros(2, 3, 2, 2), torch.zeros(2, 3, 2, 2)
    target[0] = 1.0
    target[1, 0, 0, 0] = -12.0
    assert reconstruction_loss(pred, target).item() == pytest.approx((12 + 12) / 24)
    labels = torch.tensor([0, 0, 1, 1])
    spread = torch.tensor([[0.0], [1.0], [3.0], [5.0]])  # hardest (pos, neg): (1,3) (1,2) (2,2) (2,4)
    collapsed = torch.zeros(4, 1)                        # every triplet violates the margin by 0.3
    loss = DecoderTripletLoss(margin=0.3)([spread, collapsed], labels)
    assert loss.item() == pytest.approx((0.3 / 4 + 0.3) / 2, abs=1e-5)


def test_texture_lookup_stem_first_then_pid_and_missing_folder(tmp_path):
    folder = tmp_path / "texture"
    folder.mkdir()
    for name in ("0001_c1s1_000025_00.png", "0001.png", "0002.png"):
        (folder / name).write_bytes(b"")
    names = ["0001_c1s1_000025_00.jpg", "0001_c2s1_000050_01.jpg", "0002_c1s1_000075_00.jpg"]
    table = pa.table({"path": [f"/x/{n}" for n in names], "pid": [1, 1, 2], "camid": [0, 1, 0]})
    assert [p.name for p in texture_paths(table, folder)] == ["0001_c1s1_000025_00.png", "0001.png", "0002.png"]
    with pytest.raises(ReidRayError, match="0003_c1s1_000100_00.png or <pid:04d>.png"):
        texture_paths(pa.table({"path": ["/x/0003_c1s1_000100_00.jpg"], "pid": [3], "camid": [0]}), folder)
    (tmp_path / "synth-b").mkdir()
    ds = ReIDDataset("synth-b", tmp_path, table, table, table)
    with pytest.raises(ReidRayError) as e:
        texture_folder(ds)
    assert str(tmp_path / "synth-b" / "texture") in str(e.value) and "reid-ray san-pg predict" in str(e.value)


def test_san_pg_pairs_train_predict_and_bad_input(tiny_synth, tmp_path, capsys):
    from reid_ray.cli import main as cli_main
    from reid_ray.cli.san_pg import main

    pg = tmp_path / "pg"
    assert main(["pairs", "--dataset", "synth-a", "--data-root", str(tiny_synth), "--out", str(pg)]) == 0
    lines = (pg / "pairs.txt").read_text().splitlines()
    assert len(lines) == read_dataset("synth-a", tiny_synth).train.num_rows
    (pg / "pairs.txt").write_text("\n".join(lines[:12]) + "\n")  # a handful is enough for one epoch
    assert cli_main(["san-pg", "train", "--pairs", str(pg), "--epochs", "1", "--batch-size", "4"]) == 0
    assert (pg / "san_pg.pt").is_file() and not list(pg.glob(".*.tmp"))
    out = tmp_path / "tex"
    assert main(["predict", "--checkpoint", str(pg / "san_pg.pt"), "--dataset", "synth-b",
                 "--data-root", str(tiny_synth), "--out", str(out)]) == 0
    ds = read_dataset("synth-b", tiny_synth)
    stems = {p.rsplit("/", 1)[1].rsplit(".", 1)[0] for s in ("train", "query", "gallery")
             for p in ds.split(s)["path"].to_pylist()}
    assert {p.stem for p in out.glob("*.png")} == stems
    capsys.readouterr()
    assert main(["train", "--pairs", str(tmp_path / "nowhere")]) == 2
    assert main(["predict", "--checkpoint", str(pg / "pairs.txt"), "--dataset", "synth-b",
                 "--data-root", str(tiny_synth)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "no pairs.txt" in err[0] and "not a SAN-PG checkpoint" in err[1]


def test_san_step_checkpoint_keys_and_artifact(tiny_synth, tmp_path):
    from reid_ray.config import resolve_config
    from reid_ray.methods import METHODS, Domains, EpochContext

    cfg = resolve_config("san", sets=["num_identities=4"], flags=dict(data_root=str(tiny_synth)))
    domains = Domains(read_dataset("synth-a", tiny_synth), read_dataset("synth-b", tiny_synth))
    method = METHODS["san"](cfg, domains, torch.device("cpu"))
    method.setup()
    method.on_epoch_start(EpochContext(epoch=0))
    losses = method.train_step(next(iter(method.train_loader)), EpochContext(epoch=0))
    assert {"loss", "ce", "triplet", "rec", "tr"} <= set(losses) and math.isfinite(losses["loss"].item())
    state = method.state_dict()
    baseline_keys = build_reid_net(cfg.model, method.num_classes).state_dict().keys()
    torch.save({"method": state}, tmp_path / "san.pt")
    assert METHODS["san"].source_weights(tmp_path / "san.pt").keys() == baseline_keys and "decoder" in state["models"]
    (png,) = method.eval_artifacts(tmp_path)
    assert png.is_file() and png.suffix == ".png"


def test_texture_losses_take_their_own_adam_step(tiny_synth):
    """As the authors: L_ID + L_tri step the ReID optimiser (encoder only); L_rec + L_TR then take one step
    of their own Adam (lr 1e-5, β1 0.5): Adam's first step moves each weight by lr·g/(|g| + eps)."""
    import copy

    from reid_ray.config import resolve_config
    from reid_ray.losses.san import reconstruction_loss
    from reid_ray.methods import METHODS, Domains, EpochContext

    cfg = resolve_config("san", sets=["num_identities=4", "params.texture_lr=1e-3"], flags=dict(data_root=str(tiny_synth)))
    domains = Domains(read_dataset("synth-a", tiny_synth), read_dataset("synth-b", tiny_synth))
    method = METHODS["san"](cfg, domains, torch.device("cpu"))
    method.setup()
    model = method.models["san"]
    assert not {id(q) for q in model.decoder.parameters()} & {id(q) for g in method.optimizer.param_groups
                                                              for q in g["params"]}
    ctx = EpochContext(epoch=0)
    method.on_epoch_start(ctx)
    batch = next(iter(method.train_loader))
    ref = copy.deepcopy(model)  # the texture loss's gradient by hand, on the same forward
    out = ref(batch["img"])
    p = method.p
    dec_feats = torch.cat(out["dec_feats"], 1)
    tex = p.rec_weight * reconstruction_loss(out["texture"], batch["texture"]) + p.tr_weight * method.tr(
        dec_feats.split(method.dec_dims, 1), batch["label"])
    tex.backward()
    before = {n: q.detach().clone() for n, q in model.decoder.named_parameters()}
    losses = method.train_step(batch, ctx)
    method.optimizer.zero_grad()
    losses["loss"].backward()
    method.optimizer.step()
    method.after_step(ctx)
    for (n, q), (_, g) in zip(model.decoder.named_parameters(), ref.decoder.named_parameters()):
        expected = before[n] - 1e-3 * g.grad / (g.grad.abs() + 1e-8)
        torch.testing.assert_close(q.detach(), expected, atol=2e-6, rtol=0, msg=n)


@pytest.mark.ray
def test_san_trains_under_ray_on_two_workers(ray_local, tiny_synth, tmp_path):
    from mlflow.tracking import MlflowClient

    from reid_ray.config import resolve_config
    from reid_ray.distributed.driver import run_training

    cfg = resolve_config("san", sets=["num_identities=4", "warmup_epochs=0", "params.texture_lr=1e-3",
                                              "log_model=false"], flags=dict(
        data_root=str(tiny_synth), output=str(tmp_path / "out"), mlflow_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        epochs=2, eval_every=2, workers=2))
    out = run_training(cfg)
    m = out["metrics"]
    assert {"rec", "tr", "source_mAP", "target_mAP"} <= set(m) and 0 <= m["source_mAP"] <= 100
    # one value per epoch: a worker group that Ray Train restarted (max_failures) logs the epochs it repeats again
    by_epoch = {h.step: h.value for h in sorted(MlflowClient(out["mlflow_uri"]).get_metric_history(
        out["mlflow_run_id"], "rec"), key=lambda h: h.timestamp)}
    rec = [by_epoch[e] for e in sorted(by_epoch)]
    assert sorted(by_epoch) == [1, 2] and all(math.isfinite(r) for r in rec)
    assert rec[1] < rec[0], rec  # the decoder learns the textures
