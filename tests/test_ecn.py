"""ECN: hand-checked invariance losses, the exemplar memory (update, α schedule, identical on every
DDP rank), CamStyle lookup, a short Ray-free run, and one run end to end under Ray Train."""

import math
import shutil

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image

from reid_ray.config import resolve_config
from reid_ray.data.camstyle import CamStyleDataset, camstyle_lookup
from reid_ray.data.readers import read_dataset
from reid_ray.data.transforms import TransformConfig
from reid_ray.data.transforms import test_transform as eval_transform
from reid_ray.losses.ecn import ExemplarMemory, invariance_loss, neighbourhood_targets, update_memory
from reid_ray.methods import METHODS, Domains, EpochContext
from reid_ray.training.loop import train_epoch

K3 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])


def test_exemplar_invariance_hand_computed():
    # f = (1, 0), β = 0.5: logits K·f/β = (2, 0, -2); own slot 0 (Eq. 3)
    logits = torch.tensor([[1.0, 0.0]]) @ K3.T / 0.5
    expected = -math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(-2)))
    assert invariance_loss(logits, torch.tensor([0])).item() == pytest.approx(expected, rel=1e-6)


def test_neighbourhood_targets_k2_as_the_authors_smooth_hot():
    sims = torch.tensor([[0.9, 0.1, 0.5, 0.7],    # own slot 2 is not in the top-2 (0, 3)
                         [0.9, 0.1, 0.5, 0.7]])   # own slot 0 is the top-1: only slot 3 gets 1/k
    w = neighbourhood_targets(sims, torch.tensor([2, 0]), k=2)
    assert torch.equal(w, torch.tensor([[0.5, 0.0, 1.0, 0.5], [1.0, 0.0, 0.0, 0.5]]))
    logp = F.log_softmax(sims, dim=1)
    expected = -((0.5 * logp[0, 0] + logp[0, 2] + 0.5 * logp[0, 3]) + (logp[1, 0] + 0.5 * logp[1, 3])) / 2
    assert invariance_loss(sims, torch.tensor([2, 0]), knn=2).item() == pytest.approx(expected.item(), rel=1e-6)


def test_memory_gradient_then_update_with_alpha():
    mem = ExemplarMemory(3, 2)
    mem.memory.copy_(K3)
    f = torch.tensor([[0.6, 0.8]], requires_grad=True)
    sims = mem(f, torch.tensor([1]), alpha=0.3)
    assert torch.allclose(sims, torch.tensor([[0.6, 0.8, -0.6]]))
    sims[0, 0].backward()
    assert torch.allclose(f.grad, K3[0:1])  # dS/df with the memory before the update
    new = F.normalize(0.3 * K3[1] + 0.7 * torch.tensor([0.6, 0.8]), dim=0)  # Eq. 2
    assert torch.allclose(mem.memory[1], new) and torch.allclose(mem.memory[[0, 2]], K3[[0, 2]])
    assert mem.memory[1].norm().item() == pytest.approx(1.0)


def test_first_epoch_alpha_zero_replaces_zero_initialised_slots():
    memory = torch.zeros(4, 3)
    update_memory(memory, torch.tensor([[3.0, 0.0, 4.0], [0.0, 2.0, 0.0]]), torch.tensor([3, 1]), alpha=0.0)
    assert torch.allclose(memory, torch.tensor([[0, 0, 0], [0, 1, 0], [0, 0, 0], [0.6, 0, 0.8]]))


def test_write_mask_only_writes_selected_rows():
    mem = ExemplarMemory(4, 2)
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    mem(f, torch.tensor([2, 2]), 0.0, write=torch.tensor([True, False])).sum().backward()
    assert torch.allclose(mem.memory[2], torch.tensor([1.0, 0.0])) and mem.memory[[0, 1, 3]].abs().sum() == 0


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    mem = ExemplarMemory(8, 4)
    mem.memory.copy_(F.normalize(torch.randn(8, 4), dim=1))  # the same on both ranks
    torch.manual_seed(100 + rank)                           # different features on each rank
    f = F.normalize(torch.randn(2, 4), dim=1).requires_grad_()
    idx = torch.tensor([2 * rank, 2 * rank + 1])
    invariance_loss(mem(f, idx, alpha=0.2) / 0.05, idx, knn=2).backward()
    torch.save({"memory": mem.memory, "feats": f.detach()}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_memory_identical_on_every_rank_after_a_ddp_step(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert torch.equal(r0["memory"], r1["memory"])
    torch.manual_seed(0)
    expected = F.normalize(torch.randn(8, 4), dim=1)
    update_memory(expected, torch.cat([r0["feats"], r1["feats"]]), torch.arange(4), alpha=0.2)
    assert torch.allclose(r0["memory"], expected)  # both ranks' rows, as one process would write them


def test_camstyle_lookup_and_dataset(tiny_synth):
    train = read_dataset("synth-b", tiny_synth).train
    paths, cams = train["path"].to_pylist(), train["camid"].to_numpy()
    versions = camstyle_lookup(paths)
    assert len(versions) == len(paths) and all(versions)
    for p, c, vs in zip(paths, cams, versions):
        stem = p.rsplit("/", 1)[1][:-4]
        assert all(v.endswith(".jpg") and f"/camstyle/{stem}_fake_{c + 1}to" in v for v in vs)
    tf = eval_transform(TransformConfig(height=64, width=32))
    ds = CamStyleDataset(train, tf, in_memory=True)
    a, b = ds[(3, 12345)], ds[(3, 12345)]
    assert a["img_cam"].shape == a["img"].shape == (3, 64, 32) and torch.equal(a["img_cam"], b["img_cam"])
    assert not torch.equal(a["img_cam"], a["img"])  # another camera's rendering


def test_no_camstyle_folder_warns_once_and_has_no_camera_view(tmp_path):
    folder = tmp_path / "ds" / "bounding_box_train"
    folder.mkdir(parents=True)
    paths = []
    for i in range(2):
        paths.append(str(folder / f"000{i}_c1s1_000001_00.jpg"))
        Image.new("RGB", (32, 64), (i * 100, 0, 0)).save(paths[-1])
    table = pa.table({"path": paths, "pid": [0, 1], "camid": [0, 0]})
    assert camstyle_lookup(paths) is None
    with pytest.warns(UserWarning, match="camera-invariance") as record:
        ds = CamStyleDataset(table, eval_transform(TransformConfig(height=64, width=32)))
    assert len(record) == 1 and not ds.has_camstyle and "img_cam" not in ds[(0, 1)]


def _short_run(root, **over):
    overrides = ["num_identities=4", "target_batch=16", "iters=2", "features=32", "neighbour_start_epoch=1",
                 *[f"{k}={v}" for k, v in over.items()]]
    cfg = resolve_config("ecn", sets=overrides, flags=dict(data_root=str(root)))
    method = METHODS["ecn"](cfg, Domains(read_dataset("synth-a", root), read_dataset("synth-b", root)),
                            torch.device("cpu"))
    method.setup()
    ctx = EpochContext(0)
    outs = []
    for epoch in range(2):  # epoch 1: neighbourhood invariance on, α = 0.01
        ctx.epoch = epoch
        outs.append(train_epoch(method, ctx))
    return method, outs


def test_ecn_trains_and_writes_the_memory(tiny_synth):
    method, outs = _short_run(tiny_synth, memory_init="false")  # the authors' zero-initialised memory
    for key in ("loss", "ce", "target_loss", "exemplar", "camera", "acc"):
        assert key in outs[-1] and np.isfinite(outs[-1][key]), key
    assert outs[-1]["iters"] == 2
    mem = method.memory.memory
    written = mem.norm(dim=1) > 0
    assert 0 < written.sum() <= 4 * 16 and torch.allclose(mem[written].norm(dim=1), torch.ones(int(written.sum())))
    assert {"models", "optimizer", "memory"} <= set(method.state_dict())


def test_ecn_without_camstyle_trains_without_the_camera_term(tiny_synth, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_synth, root)
    shutil.rmtree(root / "synth-b" / "camstyle")
    _, outs = _short_run(root)
    assert "camera" not in outs[-1] and outs[-1]["target_loss"] == pytest.approx(outs[-1]["exemplar"])
    # the driver's warning (warn_lost_parts) names the lost term; with the CamStyle folder, nothing
    ecn, read = METHODS["ecn"], lambda r: Domains(read_dataset("synth-a", r), read_dataset("synth-b", r))
    (lost,) = ecn.missing_parts(None, read(root))
    assert lost.startswith("has no CamStyle images (camstyle/ or bounding_box_train_camstyle/ beside")
    assert "without its camera-invariance term" in lost
    assert ecn.missing_parts(None, read(tiny_synth)) == []


def test_ecn_starts_from_adabn_and_a_memory_of_target_embeddings(tiny_synth):
    from reid_ray.evaluation import extract_features
    from reid_ray.methods.ecn import TargetEmbedding

    cfg = resolve_config("ecn", sets=["num_identities=4", "target_batch=16", "features=32"],
                         flags=dict(data_root=str(tiny_synth)))
    method = METHODS["ecn"](cfg, Domains(read_dataset("synth-a", tiny_synth), read_dataset("synth-b", tiny_synth)),
                            torch.device("cpu"))
    method.setup()
    model = method.models["net"]
    bn = model.net.bnneck
    before = bn.running_mean.clone()
    method.on_epoch_start(EpochContext(0))
    assert not torch.allclose(bn.running_mean, before)  # AdaBN: target statistics
    mem = method.memory.memory
    assert mem.shape == (method.domains.target.train.num_rows, 32)
    assert torch.allclose(mem.norm(dim=1), torch.ones(len(mem)), atol=1e-5)  # every slot filled, unit norm
    feats, _, _ = extract_features(TargetEmbedding(model), method.extract_loader)
    assert torch.allclose(mem, feats, atol=1e-5) and model.training


@pytest.mark.parametrize("target_bn", [True, False])
def test_target_bn_source_pass_leaves_running_statistics(tiny_synth, target_bn):
    cfg = resolve_config("ecn", sets=["num_identities=4", "features=32", f"target_bn={target_bn}"],
                         flags=dict(data_root=str(tiny_synth)))
    method = METHODS["ecn"](cfg, Domains(read_dataset("synth-a", tiny_synth), read_dataset("synth-b", tiny_synth)),
                            torch.device("cpu"))
    method.setup()
    model = method.models["net"].train()
    torch.manual_seed(0)
    x, t = torch.randn(4, 3, 64, 32), torch.randn(4, 3, 64, 32) + 1.0
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model(x, t)
    both = model.net.bnneck.running_mean.clone()
    model.load_state_dict(state)
    model.net(t)  # the target pass alone
    assert torch.allclose(both, model.net.bnneck.running_mean) == target_bn
