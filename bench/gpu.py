"""GPU figures on a bare CUDA machine, in one go; also runs on CPU with --tiny (tested in the suite).

    python -m bench.gpu [--out bench/out/gpu] [--data DIR] [--tiny] [--compile]

Records the device and its versions, then times (each a median of repeats after a warm-up):
  1. ResNet-50 at 256x128 training images/s, end to end with the loader on Market-shaped synthetic JPEGs
     (`reid-ray synth DIR --preset market`, written first when DIR has none): fp32, bf16 + channels_last
     (+ torch.compile with --compile);
  2. the loader alone (decode + augment, 0 and N loader processes shipping uint8 batches, N shipping the float32
     batches of `loader.ship_uint8=false`, and with `loader.decode=device`: N processes
     read the files, the training process decodes them (nvJPEG on a GPU) and augments on the device) against the
     training step alone on tensors already on the device, so an epoch's bound is known; the fastest training
     mode end to end once more with `loader.decode=device`; on a GPU the bf16 step captured whole in a CUDA
     graph (`captured_steps`), eager against captured;
  3. one MMT epoch (two nets + two mean nets, 400 iterations) and its pseudo-label refresh at Market size, then
     an iteration split into its parts (data, forward + losses, backward, optimiser, mean nets);
  4. k-means on 12,936 x 2,048 with k = 500: faiss on the GPU (faiss-gpu, where installed) and on the CPU, and
     the torch path (`clustering.backend=torch`) on the GPU;
  5. evaluation and k-reciprocal re-ranking at Market size (3,368 x 15,913), on the CPU and on the GPU (the torch
     path of both), the GPU's numbers checked against the CPU's.
  6. graphcheck: the captured step (`model.cuda_graph`) against the uncaptured one, the baseline and MMT for two
     epochs on a 20-identity set: the largest parameter difference (on a CPU, the capture's stand-in).
Writes `gpu.json` and `gpu.md` (a table for bench/RESULTS.md) into --out. --tiny shrinks every size
(a 20-id Market-shaped set, the `small` backbone at 64x32, few steps) so the whole script runs on a CPU
in about a minute: it checks the script, not the machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from bench.harness import timed


def sync() -> None:
    """The device's queued work done: `timed`'s clock reads (each a median of repeats after a warm-up run) see
    the GPU's time, not the launches'."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def versions() -> dict:
    from reid_ray.cli.doctor import cuda_runtime, installed_faiss, nvidia_driver

    try:
        import faiss
        faiss_info = {"version": getattr(faiss, "__version__", "?"), "gpus": int(faiss.get_num_gpus())
                      if hasattr(faiss, "get_num_gpus") else 0}
    except ImportError:
        faiss_info = {"version": "not installed", "gpus": 0}
    cuda = torch.cuda.is_available()
    return {"host": platform.node(), "date": time.strftime("%Y-%m-%d %H:%M"), "cpus": __import__("os").cpu_count(),
            "device": torch.cuda.get_device_name(0) if cuda else f"CPU ({platform.processor() or platform.machine()})",
            "torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda_runtime": cuda_runtime(),
            "driver": nvidia_driver(), "bf16": bool(cuda and torch.cuda.is_bf16_supported()),
            "faiss": faiss_info, "faiss_dists": installed_faiss()}


class Sizes:
    def __init__(self, tiny: bool):
        self.tiny = tiny
        self.arch, self.hw = ("small", (64, 32)) if tiny else ("resnet50", (256, 128))
        self.ids = 20 if tiny else None                 # Market-shaped identities (None: all of Market)
        self.steps = 3 if tiny else 50                  # timed training steps per repeat
        self.repeats = 2 if tiny else 3
        self.mmt_iters, self.mmt_k = (4, 10) if tiny else (400, 500)
        self.split_iters = 2 if tiny else 30            # MMT iterations timed part by part
        self.kmeans = (400, 64, 10) if tiny else (12_936, 2_048, 500)
        self.eval = (60, 300, 64) if tiny else (3_368, 15_913, 2_048)


def market_data(root: Path, sizes: Sizes) -> Path:
    from reid_ray.data.synthetic import MARKET_TOP, generate_market_shaped

    if not (root / MARKET_TOP).is_dir():
        t = time.perf_counter()
        generate_market_shaped(root, ids=sizes.ids, progress=not sizes.tiny)
        print(f"wrote the Market-shaped set under {root} in {time.perf_counter() - t:.0f} s", flush=True)
    return root


def train_setup(sizes: Sizes, data: Path, workers: int, decode: str = "cpu", ship_uint8: bool = True):
    from reid_ray.data.loader import LoaderConfig, build_train_loader, relabel
    from reid_ray.data.readers import read_dataset
    from reid_ray.data.transforms import TransformConfig
    from reid_ray.models.reid_net import ModelConfig, build_reid_net

    table = read_dataset("market1501", data).train
    labels, _ = relabel(table["pid"].to_numpy())
    tcfg = TransformConfig(height=sizes.hw[0], width=sizes.hw[1])
    lcfg = LoaderConfig(num_identities=4 if sizes.tiny else 16, num_workers=workers, decode=decode,
                        ship_uint8=ship_uint8)
    loader = build_train_loader(table, labels, tcfg, lcfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net = build_reid_net(ModelConfig(arch=sizes.arch, sync_bn=False), int(labels.max()) + 1, device)
    return loader, net, device


def train_steps(net, device, dtype, channels_last: bool):
    """A function running BoT steps (label-smoothed CE + batch-hard triplet, Adam) over (img, label) batches."""
    from reid_ray.losses import CrossEntropyLabelSmooth, TripletLoss

    ce, tri = CrossEntropyLabelSmooth(0.1), TripletLoss(0.3)
    opt = torch.optim.Adam(net.parameters(), lr=3.5e-4, fused=device.type == "cuda")  # as build_optimizer's auto
    if channels_last:
        net.to(memory_format=torch.channels_last)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)

    def run(source):
        n = 0
        for img, y in source:
            img, y = img.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if channels_last:
                img = img.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext():
                out = net(img)
                loss = ce(out["logits"], y) + tri(out["feat"].float(), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            n += len(img)
        return n
    return run


def captured_steps(net, device, dtype, img: torch.Tensor, y: torch.Tensor):
    """The BoT step (forward, losses, backward, fused Adam with its lr a device tensor) captured whole in one CUDA
    graph by `training.graphs.CapturedStep`, the class `model.cuda_graph` runs (torch.cuda.graphs' "whole
    network capture": static input buffers, a capturable optimiser, autocast without its weight-cast cache): its
    warm-up steps and the capture on the first batch, then one replay per batch."""
    from reid_ray.losses import CrossEntropyLabelSmooth, TripletLoss
    from reid_ray.training.graphs import CapturedStep, prepare_optimizer

    ce, tri = CrossEntropyLabelSmooth(0.1), TripletLoss(0.3)
    net.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(net.parameters(), lr=3.5e-4, fused=True)
    prepare_optimizer(opt, device, capture=True)

    def body(batch):
        with torch.autocast("cuda", dtype=dtype, cache_enabled=False):
            out = net(batch["img"])
            loss = ce(out["logits"], batch["label"]) + tri(out["feat"].float(), batch["label"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step = CapturedStep(body, opt, capture=True)
    first = {"img": img.to(device).contiguous(memory_format=torch.channels_last), "label": y.to(device)}
    for _ in range(step.warmup + 1):  # the warm-up steps, then the capture and its first replay
        step(first)

    def run(source):
        n = 0
        for img_, y_ in source:
            step({"img": img_, "label": y_})
            n += len(img_)
        return n
    return run


def bench_training(sizes: Sizes, data: Path, compile_: bool) -> dict:
    import itertools

    workers = loader_processes()
    loader, net, device = train_setup(sizes, data, workers)
    cuda = device.type == "cuda"
    modes = [("fp32", None, False)]
    if cuda:
        modes.append(("bf16 + channels_last" if torch.cuda.is_bf16_supported() else "fp16 + channels_last",
                      torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16, True))
    if compile_:
        modes.append((modes[-1][0] + " + compile", *modes[-1][1:]))  # fp32 + compile on a CPU
    out = {"loader_processes": workers, "modes": {}}
    epoch = itertools.count()
    batch = loader.batch_size

    def batches(k):
        loader.sampler.set_epoch(next(epoch))
        return [(b["img"], b["label"]) for b in itertools.islice(iter(loader), k)]

    device_decode, _, _ = train_setup(sizes, data, workers, decode="device")
    modes.append((modes[-1][0] + ", decode on the device", *modes[-1][1:]))
    if cuda:  # the whole step in one CUDA graph
        modes.append((modes[1][0] + ", captured (CUDA graph)", *modes[1][1:]))
    for name, dtype, cl in modes:
        model = torch.compile(net) if "compile" in name else net
        try:
            if "captured" in name:
                first = batches(1)[0]
                step = captured_steps(model, device, dtype, *first)
            else:
                step = train_steps(model, device, dtype, cl)
        except Exception as e:  # a capture that fails keeps the other modes' figures
            if sizes.tiny:
                raise
            traceback.print_exc()
            out["modes"][name] = {"error": f"{type(e).__name__}: {e}"[:300]}
            continue
        source = device_decode if "decode on the device" in name else loader

        def end_to_end(step=step, source=source):
            source.sampler.set_epoch(next(epoch))
            step((b["img"], b["label"]) for b in itertools.islice(iter(source), sizes.steps))
        fixed = [(img.to(device), y.to(device)) for img, y in batches(sizes.steps)]
        try:
            e2e = timed(end_to_end, sizes.repeats, sync=sync)
            alone = timed(lambda step=step, fixed=fixed: step(fixed), sizes.repeats, sync=sync)
        except Exception as e:  # one mode failing (a compile error, say) keeps the others' figures
            if sizes.tiny:
                raise
            traceback.print_exc()
            out["modes"][name] = {"error": f"{type(e).__name__}: {e}"[:300]}
            continue
        n = sizes.steps * batch
        out["modes"][name] = {"end_to_end_img_s": n / e2e.median, "end_to_end_spread_s": e2e.spread,
                              "step_only_img_s": n / alone.median, "step_only_spread_s": alone.spread}
        print(f"training {name}: {n / e2e.median:.0f} img/s end to end, {n / alone.median:.0f} img/s step alone",
              flush=True)
    out.update({f"loader_only_{k}": v for k, v in bench_loader(sizes, data, sizes.steps).items() if k.endswith("img_s")})
    return out


def loader_processes() -> int:
    """Loader processes beside the training process: what loader.num_workers=-1 gives on this machine's CPUs
    (one each but one), and at least one."""
    import os

    from reid_ray.data.loader import auto_loader_workers

    return max(1, auto_loader_workers(os.cpu_count() or 2))


def bench_loader(sizes: Sizes, data: Path, batches: int = 40) -> dict:
    """The train loader alone (decode + augment + collate) at the benchmark's size, 0 and N processes."""
    import itertools

    out = {}
    runs = [*((p, "cpu", True) for p in sorted({0, loader_processes()})), (loader_processes(), "device", True),
            (loader_processes(), "cpu", False)]
    for procs, decode, uint8 in runs:
        loader, _, _ = train_setup(sizes, data, procs, decode, ship_uint8=uint8)
        epoch = itertools.count()

        def load(loader=loader, epoch=epoch):
            loader.sampler.set_epoch(next(epoch))
            for _ in itertools.islice(iter(loader), batches):
                pass
        run = timed(load, sizes.repeats, sync=sync)
        t, s = run.median, run.spread
        key = f"{procs}_processes" + ("_device_decode" if decode == "device" else "") + ("" if uint8 else "_float32")
        out[f"{key}_img_s"] = batches * loader.batch_size / t
        out[f"{key}_spread_s"] = s
        print(f"loader alone at {sizes.hw[0]}x{sizes.hw[1]}, {procs} processes"
              f"{', decode + augment on the device' if decode == 'device' else ''}"
              f"{', float32 batches (normalised in the loader processes)' if not uint8 else ''}: "
              f"{batches * loader.batch_size / t:.0f} img/s (spread {s:.2f} s over {sizes.repeats} runs)", flush=True)
    return out


def bench_step_profile(sizes: Sizes, data: Path) -> dict:
    """What bounds the training step alone: img/s at P x K = 16 x 4 (the papers' 64) and 64 x 4 (256), bf16 +
    channels_last on a GPU. A step whose time grows far less than its batch is bound by a fixed per-step cost
    on the host (Python, kernel launches, synchronisations), not by the GPU's arithmetic. (torch.profiler's
    kernel table was tried for a busy share: building it took over 60 s on the H200's VM, so it is not used.)"""
    loader, net, device = train_setup(sizes, data, 0)
    cuda = device.type == "cuda"
    dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if cuda else None
    step = train_steps(net, device, dtype, cuda)
    first = next(iter(loader))
    img, y = first["img"], first["label"]
    out = {"dtype": str(dtype), "batches": {}}
    for mult in (1, 4):
        labels = (y.repeat(mult) + torch.arange(mult).repeat_interleave(len(y)) * (int(y.max()) + 1)) % out_classes(net)
        fixed = [(img.repeat(mult, 1, 1, 1).to(device), labels.to(device))] * sizes.steps
        t = timed(lambda f=fixed: step(f), sizes.repeats, sync=sync).median
        out["batches"][len(img) * mult] = {"step_only_img_s": len(img) * mult * sizes.steps / t,
                                           "step_ms": 1000 * t / sizes.steps}
        print(f"step alone, batch {len(img) * mult}: {len(img) * mult * sizes.steps / t:.0f} img/s, "
              f"{1000 * t / sizes.steps:.1f} ms a step", flush=True)
    b = sorted(out["batches"])
    (t1, t4) = (out["batches"][k]["step_ms"] for k in b)
    # time = fixed + per_image * batch, from the two batches
    out["fixed_ms"] = t1 - (t4 - t1) / (b[1] - b[0]) * b[0]
    return out


def out_classes(net) -> int:
    return next(m for m in reversed(list(net.modules())) if isinstance(m, torch.nn.Linear)).out_features


def bench_mmt(sizes: Sizes, data: Path) -> dict:
    from reid_ray.clustering.client import LocalClusterer
    from reid_ray.config import resolve_config
    from reid_ray.data.domains import Domains
    from reid_ray.data.readers import read_dataset
    from reid_ray.methods import METHODS, EpochContext
    from reid_ray.training.loop import finish_networks, gpu_layout, train_epoch

    ds = read_dataset("market1501", data)
    sets = [f"params.num_clusters={sizes.mmt_k}", f"params.iters={sizes.mmt_iters}", f"model.arch={sizes.arch}",
            f"transform.height={sizes.hw[0]}", f"transform.width={sizes.hw[1]}", "model.sync_bn=false"]
    if sizes.tiny:
        sets += ["loader.num_identities=4", "loader.num_workers=0"]
    cfg = resolve_config("mmt", "market1501", "market1501", sets=sets, flags=dict(data_root=str(data)))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    method = METHODS["mmt"](cfg, Domains(ds, ds), device)
    t = ds.train
    method.clusterer = LocalClusterer(METHODS["mmt"].cluster_spec(cfg), t["pid"].to_numpy(), t["camid"].to_numpy())
    method.setup(wrap=gpu_layout(lambda m: m, device))  # the layout a Ray Train worker gives them
    finish_networks(method, device, compile_=False)
    start = time.perf_counter()
    ctx = EpochContext(0)
    out = train_epoch(method, ctx, amp=True)
    sync()
    total = time.perf_counter() - start
    res = {"epoch_s": total, "refresh_s": out["refresh_time"], "train_s": out["epoch_time"], "iters": out["iters"],
           "images_per_s": out["images_per_s"], "refresh_share": out["refresh_time"] / total,
           "iteration_ms": 1000 * out["epoch_time"] / max(out["iters"], 1),
           "cluster_s": out.get("pseudo_cluster_time", float("nan")),
           "cluster_on_gpu": out.get("pseudo_cluster_on_gpu", 0.0)}
    print(f"MMT epoch: {total:.1f} s ({out['iters']:.0f} iterations, {res['iteration_ms']:.0f} ms each), refresh "
          f"{out['refresh_time']:.1f} s (clustering {res['cluster_s']:.2f} s)", flush=True)
    res["split_ms"] = mmt_split(method, ctx, sizes.split_iters)
    print("MMT iteration, split (each part synchronised): " + ", ".join(
        f"{k} {v:.1f} ms" for k, v in res["split_ms"].items()), flush=True)
    if device.type == "cuda":
        res.update(mmt_captured(method, ctx))
    return res


def mmt_captured(method, ctx) -> dict:
    """One more epoch of the same iterations with the whole step captured in one CUDA graph, as
    `--set model.cuda_graph=true` runs it (`training.loop.StepGraph`), without a refresh: its ms an iteration,
    the three eager warm-up steps and the capture included."""
    from reid_ray.training.loop import train_epoch

    method.p.refresh_every = 10**9  # the pseudo-labels of epoch 0 stay: this epoch times the steps alone
    method.cfg.model.cuda_graph = True
    ctx.epoch += 1
    try:
        out = train_epoch(method, ctx, amp=True)
    except Exception as e:  # a capture that fails keeps the eager figures
        traceback.print_exc()
        return {"captured_error": f"{type(e).__name__}: {e}"[:300]}
    ms = 1000 * out["epoch_time"] / max(out["iters"], 1)
    print(f"MMT iteration, captured (model.cuda_graph): {ms:.0f} ms ({out['iters']:.0f} iterations, 3 eager and the "
          f"capture included)", flush=True)
    return {"captured_iteration_ms": ms, "captured_iters": out["iters"]}


def mmt_split(method, ctx, iters: int) -> dict[str, float]:
    """Milliseconds an MMT iteration spends in each part, over `iters` iterations, the device synchronised after
    each part (so the parts add up to more than the unsynchronised iteration: the host's and the GPU's work no
    longer overlap): the next batch (loading, and finishing on the device), forward of both nets and both mean
    nets with the losses, backward, the optimiser, the mean nets' update."""
    from reid_ray.data.loader import epoch_batches
    from reid_ray.training.loop import amp_dtype, to_device

    device = method.device
    cuda = device.type == "cuda"
    dtype = amp_dtype(device) if cuda else None
    parts = dict.fromkeys(("data", "forward_and_losses", "backward", "optimiser", "mean_nets"), 0.0)
    batches = epoch_batches(method.train_loader, iters)

    def lap(name, t):
        sync()
        parts[name] += time.perf_counter() - t
        return time.perf_counter()
    for _ in range(iters):
        t = time.perf_counter()
        batch = next(batches)
        if cuda:
            to_device(batch, device)
        t = lap("data", t)
        with torch.autocast("cuda", dtype=dtype) if cuda else nullcontext():
            losses = method.train_step(batch, ctx)
        t = lap("forward_and_losses", t)
        method.optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        t = lap("backward", t)
        method.optimizer.step()
        t = lap("optimiser", t)
        method.after_step(ctx)
        lap("mean_nets", t)
        ctx.iteration += 1
    return {k: 1000 * v / iters for k, v in parts.items()}


def bench_kmeans(sizes: Sizes) -> dict:
    """k-means of Market's size by every engine the PseudoLabeler can use here: faiss's GPU build (where it is
    installed), faiss-cpu, and the torch path (`clustering.backend=torch`) on the GPU (on the CPU with --tiny);
    each with its objective, so the engines are compared at equal quality."""
    from reid_ray.clustering.kmeans import faiss_gpus, kmeans_labels

    n, d, k = sizes.kmeans
    x = np.random.default_rng(0).standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    out = {"shape": [n, d, k]}
    engines = (["gpu"] if faiss_gpus() else []) + ["cpu"]
    engines += ["torch_gpu"] if torch.cuda.is_available() else (["torch_cpu"] if sizes.tiny else [])
    for where in engines:
        kw = {"backend": "torch"} if where.startswith("torch") else {"backend": "faiss", "use_gpu": where == "gpu"}
        km = timed(lambda kw=kw: kmeans_labels(x, k, seed=0, **kw), sizes.repeats, sync=sync)
        out[f"{where}_s"], out[f"{where}_spread_s"] = km.median, km.spread
        out[f"{where}_objective"] = km.out.stats.get("kmeans_objective", float("nan"))
        print(f"k-means {n} x {d}, k={k}, {where}: {km.median:.2f} s (objective {out[f'{where}_objective']:.1f})",
              flush=True)
    return out


def bench_eval(sizes: Sizes) -> dict:
    """evaluate_rank and re_ranking at Market size on the CPU and, where there is one, on the GPU (the torch
    path: the distance matrices are CUDA tensors); the GPU's numbers are checked against the CPU's."""
    from reid_ray.evaluation import evaluate_rank, pairwise_distance, re_ranking

    nq, ng, d = sizes.eval
    rng = np.random.default_rng(0)
    ids = rng.integers(0, nq // 4 + 2, nq + ng)
    centres = rng.standard_normal((ids.max() + 1, d)).astype(np.float32)
    feats = torch.from_numpy(centres[ids] + 0.7 * rng.standard_normal((nq + ng, d)).astype(np.float32))
    cams = rng.integers(0, 6, nq + ng)
    qf, gf = feats[:nq], feats[nq:]
    out = {"shape": [nq, ng, d]}
    dists = (pairwise_distance(qf, gf), pairwise_distance(qf, qf), pairwise_distance(gf, gf))
    results = {}
    for where in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        qg, qq, gg = (x.to(where) for x in dists)
        calls = (("evaluate_rank", lambda qg=qg: evaluate_rank(qg, ids[:nq], ids[nq:], cams[:nq], cams[nq:])[1],
                  sizes.repeats), ("re_ranking", lambda qg=qg, qq=qq, gg=gg: re_ranking(qg, qq, gg), 1))
        for key, fn, repeats in calls:
            run = timed(fn, repeats, sync=sync)
            out[f"{key}_{where}_s"], out[f"{key}_{where}_spread_s"] = run.median, run.spread
            results.setdefault(where, {})[key] = run.out  # the last timed call's value, for the GPU-vs-CPU check
        print(f"{where}: evaluate_rank {nq} x {ng}: {out[f'evaluate_rank_{where}_s']:.2f} s; re-ranking: "
              f"{out[f're_ranking_{where}_s']:.1f} s", flush=True)
    if "cuda" in results:
        out["cuda_vs_cpu_mAP_diff"] = abs(results["cuda"]["evaluate_rank"] - results["cpu"]["evaluate_rank"])
        out["cuda_vs_cpu_re_ranking_max_diff"] = float(np.abs(results["cuda"]["re_ranking"]
                                                              - results["cpu"]["re_ranking"]).max())
    return out


def bench_graph_check(sizes: Sizes, data: Path) -> dict:
    """Whether `model.cuda_graph` trains as the uncaptured step does: the baseline (center loss on, the lr changing
    over two warmup epochs) and MMT (two refreshes) on the 20-identity Market-shaped set, the `small` backbone at
    64x32, fp32 and cuDNN deterministic, each run twice with the same optimiser (fused, its lr a device tensor):
    the step captured in a CUDA graph (`StepGraph`) and the device-side step uncaptured. Reports the largest
    parameter difference (zero up to the GPU's nondeterministic atomics) and both runs' losses. On a CPU the capture
    is replaced by its stand-in (the body on the static buffers), as tests/test_cuda_graph.py does."""
    from reid_ray.clustering.client import LocalClusterer
    from reid_ray.config import resolve_config
    from reid_ray.data.domains import Domains
    from reid_ray.data.readers import read_dataset
    from reid_ray.methods import METHODS, EpochContext
    from reid_ray.training.graphs import prepare_optimizer
    from reid_ray.training.loop import StepGraph, finish_networks, gpu_layout, train_epoch

    small = data if sizes.tiny else market_data(data.parent / f"{data.name}-20", Sizes(tiny=True))
    ds = read_dataset("market1501", small)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    common = ["model.arch=small", "transform.height=64", "transform.width=32", "loader.num_identities=4",
              "loader.num_workers=0", "optim.fused=true"]
    cases = {"baseline": ["optim.warmup_epochs=2", "params.center_loss_weight=0.0005"],
             "mmt": ["params.num_clusters=10", "params.iters=8"]}
    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic = True
    out = {"device": device.type, "captured": cuda}
    try:
        for name, sets in cases.items():
            runs = []
            for captured in (False, True):
                cfg = resolve_config(name, "market1501", "market1501", sets=common + sets,
                                     flags=dict(data_root=str(small)))
                method = METHODS[name](cfg, Domains(ds, ds), device)
                if method.uses_clustering:
                    method.clusterer = LocalClusterer(METHODS[name].cluster_spec(cfg), ds.train["pid"].to_numpy())
                method.setup(wrap=gpu_layout(lambda m: m, device))
                finish_networks(method, device, compile_=False)
                torch.backends.cudnn.benchmark = False  # the same convolution algorithms in both runs
                if captured:
                    method.step_graph = StepGraph(method, capture=cuda)
                else:
                    prepare_optimizer(method.optimizer, device, capture=False)
                ctx, losses = EpochContext(0), []
                for epoch in range(2):
                    ctx.epoch = epoch
                    res = train_epoch(method, ctx, amp=False)
                    losses.append(res["loss"])
                runs.append((method, losses, res))
            (plain, loss_p, _), (graphed, loss_g, res) = runs
            diff = 0.0
            for a, b in zip(plain.state_dict()["models"].values(), graphed.state_dict()["models"].values()):
                for k, v in a.items():
                    if v.is_floating_point():
                        diff = max(diff, float((v - b[k]).abs().max()))
            out[name] = {"max_param_diff": diff, "loss_uncaptured": loss_p, "loss_captured": loss_g,
                         "captures": res.get("graph_captures"), "iters": res["iters"]}
            print(f"graph check, {name}: largest parameter difference {diff:.3g}, losses {loss_p} (uncaptured) "
                  f"{loss_g} (captured, {res.get('graph_captures')} capture(s))", flush=True)
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = benchmark, False
    return out


SECTIONS = ("training", "mmt", "kmeans", "eval", "profile", "graphcheck")


def markdown(rec: dict) -> str:
    """The table of every section `rec` holds (a run cut short, or given --sections, has fewer)."""
    v, tr = rec["versions"], rec.get("training", {"modes": {}})
    lines = [f"`python -m bench.gpu{rec.get('argv', ' --tiny' if rec['tiny'] else '')}` on {v['device']} ({v['cpus']} CPUs, "
             f"{v['host']}, {v['date']}; torch {v['torch']}, CUDA build {v['torch_cuda']}, runtime {v['cuda_runtime']}, "
             f"driver {v['driver']}, faiss {v['faiss']['version']} with {v['faiss']['gpus']} GPUs, bf16 {v['bf16']})", "",
             "| what | figure |", "|---|---|"]
    for name, m in tr["modes"].items():
        if "error" in m:
            lines.append(f"| {rec['arch']} training, {name} | failed: {m['error']} |")
            continue
        lines.append(f"| {rec['arch']} {rec['hw'][0]}x{rec['hw'][1]} training, {name}, end to end "
                     f"({tr['loader_processes']} loader processes) | {m['end_to_end_img_s']:.0f} img/s |")
        lines.append(f"| same, the step alone (batches already on the device) | {m['step_only_img_s']:.0f} img/s |")
    for k, val in tr.items():
        if k.startswith("loader_only"):
            where = "on the device" if "device_decode" in k else "in the loader processes"
            ships = "float32 batches, normalised in the loader" if "float32" in k else "uint8 batches"
            lines.append(f"| loader alone, {k.split('_')[2]} processes (decode + augment {where}; {ships}) | "
                         f"{val:.0f} img/s |")
    if "mmt" in rec:
        m = rec["mmt"]
        lines.append(f"| one MMT epoch ({m['iters']:.0f} iterations, two nets + two mean nets) | {m['epoch_s']:.1f} s, "
                     f"refresh {m['refresh_s']:.1f} s ({100 * m['refresh_share']:.0f} %) |")
        if "iteration_ms" in m:
            lines.append(f"| MMT iteration (unsynchronised, in the epoch) | {m['iteration_ms']:.0f} ms |")
            lines.append(f"| MMT refresh's clustering (k-means, {'GPU' if m['cluster_on_gpu'] else 'CPU'}) | "
                         f"{m['cluster_s']:.2f} s |")
        if "split_ms" in m:
            lines.append("| MMT iteration split (synchronised after each part) | " + ", ".join(
                f"{k.replace('_', ' ')} {v:.1f} ms" for k, v in m["split_ms"].items()) + " |")
        if "captured_iteration_ms" in m:
            lines.append(f"| MMT iteration captured in one CUDA graph (model.cuda_graph, warm-up and capture "
                         f"included) | {m['captured_iteration_ms']:.0f} ms |")
        elif "captured_error" in m:
            lines.append(f"| MMT iteration captured in one CUDA graph | failed: {m['captured_error'][:120]} |")
    for name, g in rec.get("graphcheck", {}).items():
        if isinstance(g, dict):
            lines.append(f"| {name}, step captured in one CUDA graph{'' if rec['graphcheck']['captured'] else ' (CPU stand-in)'}"
                         f" against uncaptured: largest parameter difference after 2 epochs | {g['max_param_diff']:.3g} |")
    km = rec.get("kmeans", {})
    names = {"gpu": "faiss GPU", "cpu": "faiss CPU", "torch_gpu": "torch GPU", "torch_cpu": "torch CPU"}
    for where, label in names.items():
        if f"{where}_s" in km:
            obj = km.get(f"{where}_objective")
            lines.append(f"| k-means {km['shape'][0]} x {km['shape'][1]}, k = {km['shape'][2]}, {label} | "
                         f"{km[f'{where}_s']:.2f} s" + (f" (objective {obj:.1f})" if obj is not None else "") + " |")
    ev = rec.get("eval", {})
    for where in ("cuda", "cpu"):
        if f"evaluate_rank_{where}_s" in ev:
            lines.append(f"| evaluate_rank {ev['shape'][0]} x {ev['shape'][1]}, {where.upper()} | "
                         f"{ev[f'evaluate_rank_{where}_s']:.2f} s |")
            lines.append(f"| k-reciprocal re-ranking {ev['shape'][0]} x {ev['shape'][1]}, {where.upper()} | "
                         f"{ev[f're_ranking_{where}_s']:.1f} s |")
    pr = rec.get("profile", {})
    for b, m in pr.get("batches", {}).items():
        lines.append(f"| training step alone ({pr['dtype']}), batch {b} | {m['step_only_img_s']:.0f} img/s, "
                     f"{m['step_ms']:.1f} ms a step |")
    if "fixed_ms" in pr:
        lines.append(f"| the step's fixed cost, from those two (time = fixed + per image × batch) | "
                     f"{pr['fixed_ms']:.1f} ms a step |")
    for name, err in rec.get("errors", {}).items():
        lines.append(f"| section {name} | failed: {err} |")
    if "cuda_vs_cpu_re_ranking_max_diff" in ev:
        lines.append(f"| GPU vs CPU: mAP diff / re-ranking max diff | {ev['cuda_vs_cpu_mAP_diff']:.1e} / "
                     f"{ev['cuda_vs_cpu_re_ranking_max_diff']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench/out/gpu")
    ap.add_argument("--data", default=None, help="folder with (or for) the Market-shaped JPEGs")
    ap.add_argument("--tiny", action="store_true", help="small sizes: runs on a CPU in about a minute")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile")
    ap.add_argument("--loader-only", action="store_true",
                    help="only the loader alone at full size (0 and N processes): the figure a CPU machine can give")
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), metavar="SECTION",
                    help=f"what to time, in this order (default: all of {', '.join(SECTIONS)})")
    ap.add_argument("--mmt-iters", type=int, default=None, help="MMT iterations timed (default 400, the paper's)")
    ap.add_argument("--steps", type=int, default=None, help="training steps (and loader batches) a timed run "
                    "(default 50)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs after the warm-up, their median kept "
                    "(default 3)")
    args = ap.parse_args(argv)
    from reid_ray import write_text_atomic

    sizes = Sizes(args.tiny)
    sizes.mmt_iters = args.mmt_iters or sizes.mmt_iters
    sizes.steps, sizes.repeats = args.steps or sizes.steps, args.repeats or sizes.repeats
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = market_data(Path(args.data or out / "market-shaped"), sizes)
    rec = {"tiny": args.tiny, "arch": sizes.arch, "hw": sizes.hw, "versions": versions(),
           "argv": "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv))}
    print(json.dumps(rec["versions"]), flush=True)
    if args.loader_only:
        rec["loader"] = bench_loader(sizes, data)
        write_text_atomic(out / "loader.json", json.dumps(rec, indent=1))
        return rec
    runs = {"training": lambda: bench_training(sizes, data, args.compile), "mmt": lambda: bench_mmt(sizes, data),
            "kmeans": lambda: bench_kmeans(sizes), "eval": lambda: bench_eval(sizes),
            "profile": lambda: bench_step_profile(sizes, data), "graphcheck": lambda: bench_graph_check(sizes, data)}
    for name in args.sections:
        try:
            rec[name] = runs[name]()
        except Exception as e:  # on a device lease, one section failing keeps the others' figures
            if args.tiny:
                raise
            traceback.print_exc()
            rec.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"[:300]
        # saved after each section: a run stopped at a time limit keeps what it measured
        write_text_atomic(out / "gpu.json", json.dumps(rec, indent=1))
        write_text_atomic(out / "gpu.md", markdown(rec))
    print(markdown(rec))
    return rec


if __name__ == "__main__":
    main()
