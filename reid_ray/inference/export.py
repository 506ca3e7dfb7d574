"""Getting a trained embedder out of reid-ray: ONNX export, embedding a folder, evaluating any checkpoint.

    reid-ray export --checkpoint outputs/<run>/best.pt --onnx embedder.onnx
    reid-ray embed --checkpoint outputs/<run>/best.pt --images photos/ --out feats.parquet
    reid-ray evaluate --checkpoint outputs/<run>/best.pt --dataset market1501 --data-root /datasets [--rerank]

`--checkpoint` is any checkpoint reid-ray writes: a Ray Train checkpoint folder (its checkpoint.pt), a run's
best.pt, a cached source model outputs/pretrain/baseline-*.pt; a folder holding checkpoint.pt or best.pt.

The embedder is what evaluation measures: the network in eval mode (backbone -> global average pooling ->
BNNeck), its BN feature f_i, L2-normalised (`evaluation.extract_features`), so the dot product of two
features is their cosine similarity and 2 - 2·dot their squared distance, the one evaluation ranks by.
Its input is the checkpoint's test transform: RGB resized to the config's height × width, scaled to
[0, 1], then normalised with the ImageNet mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225),
NCHW float32. The ONNX graph does not fold that normalisation in: a caller applies it (the ONNX file's
metadata holds the mean, std and size), exactly as `reid-ray embed` does.

The network: a method with one re-ID network exports it. One with several (MMT: two networks and their
two mean networks) exports the one its evaluation reports, the first it evaluates (`Method.eval_model`:
MMT's mean net 1, never picked by its score on the test labels, `engine.evaluate_method`);
`--net NAME` picks any other (the error for a wrong name lists them).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import hashlib
import io
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from reid_ray import ReidRayError, atomic_path, storage

if TYPE_CHECKING:
    import torch
    from torch import nn

# torch, torchvision and the data package load when a command runs: the CLI's help stays instant

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
INSTALL_HINT = "pip install -e '.[export]'"
CHECKPOINT_HELP = "a checkpoint.pt, a run's best.pt, a cached outputs/pretrain/baseline-*.pt, or a folder holding one"


# --------------------------------------------------------------------------- the checkpoint's retrieval network

def retrieval_module(net: nn.Module) -> nn.Module:
    """A re-ID network as evaluation uses it (`extract_features`): eval mode, the BNNeck feature, L2-normalised."""
    return _retrieval_class()(net)


@functools.cache
def _retrieval_class() -> type:
    import torch.nn.functional as F
    from torch import nn

    class RetrievalEmbedder(nn.Module):
        def __init__(self, net: nn.Module):
            super().__init__()
            self.net = net.eval()

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return F.normalize(self.net(images), dim=1)

    return RetrievalEmbedder


@dataclasses.dataclass
class Embedder:
    """The retrieval network of one checkpoint, with what a caller needs to feed it."""
    net: nn.Module                # ReIDNet in eval mode (returns the BN feature)
    cfg: object                   # TrainConfig: the checkpoint's model, transform and loader sections
    method: str                   # the method that trained it
    network: str                  # which of the checkpoint's networks (e.g. "net", "mean_net2")
    networks: list[str]           # every network the checkpoint holds
    path: Path                    # the checkpoint file
    digest: str                   # sha256 of that file

    @property
    def module(self) -> nn.Module:
        """The torch module `export` writes: images -> L2-normalised features."""
        return retrieval_module(self.net)

    @property
    def size(self) -> tuple[int, int]:
        return self.cfg.transform.height, self.cfg.transform.width

    @property
    def dim(self) -> int:
        return int(self.net.feat_dim)


def checkpoint_file(path: str | Path) -> Path:
    """The checkpoint file `path` names: the file itself, or a folder's checkpoint.pt (or best.pt)."""
    from reid_ray.training.checkpoint import CHECKPOINT_FILE

    p = Path(path).expanduser()
    if p.is_dir():
        for name in (CHECKPOINT_FILE, "best.pt"):
            if (p / name).is_file():
                return p / name
        raise ReidRayError(f"--checkpoint {path}: the folder holds no {CHECKPOINT_FILE} or best.pt; pass "
                           f"{CHECKPOINT_HELP}")
    if not p.is_file():
        raise ReidRayError(f"--checkpoint {path}: no such file or folder; pass {CHECKPOINT_HELP}")
    return p


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _is_reid_net(state) -> bool:
    """A ReIDNet's weights: a BNNeck (and its classifier, except where the method drops it: SpCL classifies
    against its memory)."""
    return isinstance(state, dict) and "bnneck.weight" in state and "bnneck.running_mean" in state


def network_states(method_state: dict) -> tuple[dict[str, dict], list[str]]:
    """({name: ReIDNet state dict} of every re-ID network in a method's checkpoint state, the names its
    evaluation reports, in `Method.eval_models` order).

    Read from the state's layout, so any method's checkpoint works: `models` holds the networks under their
    names (a ReIDNet's keys, or a wrapper's with the ReIDNet under `net.`, as ECN's); `emas` (mean teachers)
    are `mean_net1`, `mean_net2`, ... and, when present, what the method evaluates."""
    nets: dict[str, dict] = {}
    models = method_state.get("models") if isinstance(method_state, dict) else None
    emas = method_state.get("emas") if isinstance(method_state, dict) else None
    means = [f"mean_net{i + 1}" for i, s in enumerate(emas or []) if _is_reid_net(s)]
    for name, s in zip(means, emas or []):
        nets[name] = s
    for name, s in (models or {}).items():
        if _is_reid_net(s):
            nets[name] = s
        elif isinstance(s, dict) and _is_reid_net({k[4:]: v for k, v in s.items() if k.startswith("net.")}):
            nets[name] = {k[4:]: v for k, v in s.items() if k.startswith("net.")}
    evaluated = means or list(nets)
    return nets, evaluated


def _checkpoint_config(path: Path, state: dict):
    from reid_ray.config import from_dict

    cfg = state.get("config")
    if not isinstance(cfg, dict):
        raise ReidRayError(f"--checkpoint {path}: a reid-ray checkpoint without its config; pass one written by "
                           "reid-ray train (a checkpoint.pt, best.pt or outputs/pretrain/baseline-*.pt)")
    try:  # the sections the embedder needs: any method's checkpoint reads, a user's own method included
        return from_dict({k: cfg[k] for k in ("model", "transform", "loader") if k in cfg}), str(cfg.get("method", "?"))
    except ReidRayError as e:
        raise ReidRayError(f"--checkpoint {path}: its config does not fit this reid-ray ({e}); export it with "
                           "the reid-ray version that trained it") from None


def load_embedder(checkpoint: str | Path, net: str | None = None, device: str | torch.device = "cpu") -> Embedder:
    """The retrieval network of a reid-ray checkpoint (see the module's docstring for which), in eval mode."""
    from torch import nn

    from reid_ray.training.checkpoint import load_checkpoint
    from reid_ray.models.reid_net import ReIDNet

    path = checkpoint_file(checkpoint)
    try:
        state = load_checkpoint(path, "--checkpoint")
    except ReidRayError:
        raise
    except Exception as e:  # what load_checkpoint does not expect of a damaged file (the unpickler's KeyError)
        raise ReidRayError(f"--checkpoint {path}: not a checkpoint torch can read ({type(e).__name__}); pass "
                           f"{CHECKPOINT_HELP}") from None
    cfg, method = _checkpoint_config(path, state)
    nets, evaluated = network_states(state["method"])
    if not nets:
        raise ReidRayError(f"--checkpoint {path}: holds no re-ID network (backbone + BNNeck) to embed with; pass "
                           "a checkpoint written by reid-ray train")
    name = net or evaluated[0]  # the network evaluation reports (engine.evaluate_method)
    if name not in nets:
        raise ReidRayError(f"--net {name}: the {method} checkpoint has no such network; valid: {', '.join(nets)}")
    weights = nets[name]
    model_cfg = dataclasses.replace(cfg.model, pretrained="none")  # the checkpoint holds every weight
    try:
        classifier = weights.get("classifier.weight")
        model = ReIDNet(model_cfg, int(classifier.shape[0]) if classifier is not None else 1)
        if classifier is None:
            model.classifier = nn.Identity()  # not used by the embedder
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise ReidRayError(f"--checkpoint {path}: its {name} weights do not fit its config's model.arch="
                           f"{cfg.model.arch} ({str(e).splitlines()[0][:160]}); the checkpoint is damaged") from None
    return Embedder(model.to(device).eval(), cfg, method, name, list(nets), path, file_digest(path))


def pick_device(name: str) -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ReidRayError(f"--device {name}: not a torch device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ReidRayError(f"--device {name}: this machine has no CUDA GPU torch can use; pass --device cpu")
    return device


def _require(command: str, *modules: str) -> None:
    import importlib

    missing = []
    for m in modules:
        try:
            importlib.import_module(m)
        except ImportError:
            missing.append(m)
    if missing:
        raise ReidRayError(f"reid-ray {command} needs {', '.join(modules)}; not installed: {', '.join(missing)}. "
                           f"Install them with {INSTALL_HINT}")


# --------------------------------------------------------------------------- reid-ray export

def metadata(emb: Embedder) -> dict[str, str]:
    """What a caller needs beside the graph (ONNX metadata_props, the Parquet schema's metadata)."""
    from reid_ray.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    h, w = emb.size
    return {"model_digest": emb.digest, "checkpoint": str(emb.path), "method": emb.method, "network": emb.network,
            "feature": f"L2-normalised BNNeck feature (eval mode), {emb.dim} floats; cosine similarity = dot product",
            "input": f"RGB NCHW float32, 3x{h}x{w}: resized to {h}x{w}, scaled to [0, 1], then (x - mean) / std",
            "mean": ",".join(map(str, IMAGENET_MEAN)), "std": ",".join(map(str, IMAGENET_STD)),
            "height": str(h), "width": str(w)}


def _torch_export(module: nn.Module, example: torch.Tensor, path: Path) -> str:
    """torch.onnx.export with a dynamic batch axis: the torch.export-based exporter, or the TorchScript one
    where that fails. Returns which exporter wrote `path`."""
    import torch

    names = {"input_names": ["images"], "output_names": ["features"]}
    said = io.StringIO()  # what the exporter prints while it tries (its steps, a failed attempt's report)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
            warnings.simplefilter("ignore", FutureWarning)  # torch.export's notes on its own internals
            # weights inside the one file (external_data=False): a sidecar .data file would keep the temp name
            torch.onnx.export(module, (example,), str(path), dynamo=True, verbose=False, external_data=False,
                              dynamic_shapes=({0: torch.export.Dim("batch")},), **names)
        return "dynamo"
    except Exception as first:  # an operator the new exporter cannot take yet: the TorchScript exporter
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # "legacy TorchScript-based ONNX export"
                torch.onnx.export(module, (example,), str(path), dynamo=False,
                                  dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}}, **names)
            return "torchscript"
        except Exception as second:
            raise ReidRayError(f"torch.onnx.export failed: {type(first).__name__}: {str(first).splitlines()[0][:160]}"
                               f"; then the TorchScript exporter: {type(second).__name__}: "
                               f"{str(second).splitlines()[0][:160]}") from None


def export_onnx(emb: Embedder, out: str | Path, check: bool = True) -> dict:
    """Write `emb` as ONNX to `out` (atomically): input `images` (N, 3, H, W) normalised as the module's
    docstring says, output `features` (N, D) L2-normalised, N dynamic. `check`: onnxruntime's features of a
    random batch of 3 against torch's. Returns {"path", "exporter", "max_abs_diff"}."""
    _require("export", "onnx", "onnxscript", "onnxruntime")
    import onnx
    import torch

    from reid_ray.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    out = Path(out).expanduser()
    if not out.parent.is_dir():
        raise ReidRayError(f"--onnx {out}: folder {out.parent} does not exist; create it or pick another path")
    module = retrieval_module(copy.deepcopy(emb.net).cpu()).eval()  # the caller's network stays where it is
    h, w = emb.size
    example = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(0))
    with atomic_path(out) as tmp:
        exporter = _torch_export(module, example, tmp)
        model = onnx.load(str(tmp))
        for k, v in metadata(emb).items():
            entry = model.metadata_props.add()
            entry.key, entry.value = k, v
        model.doc_string = (f"reid-ray {emb.method} embedder ({emb.network}) from {emb.path.name} (sha256 "
                            f"{emb.digest[:12]}): {metadata(emb)['input']}; mean {IMAGENET_MEAN}, std {IMAGENET_STD}")
        onnx.save(model, str(tmp))
        diff = check_onnx(tmp, module, batch=3) if check else float("nan")
    return {"path": out, "exporter": exporter, "max_abs_diff": diff}


def onnx_session(path: str | Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def check_onnx(path: str | Path, module: nn.Module, batch: int = 3) -> float:
    """The largest |onnxruntime - torch| over the features of a random batch; an error above 1e-3."""
    import numpy as np
    import torch

    x = torch.randn(batch, 3, *onnx_input_size(path), generator=torch.Generator().manual_seed(1))
    got = onnx_session(path).run(["features"], {"images": x.numpy()})[0]
    with torch.no_grad():
        diff = float(np.abs(got - module.eval()(x).numpy()).max())
    if not diff <= 1e-3:
        raise ReidRayError(f"the exported ONNX graph's features differ from torch's by {diff:.3g}; report this "
                           "with the checkpoint's config (model.arch)")
    return diff


def onnx_input_size(path: str | Path) -> tuple[int, int]:
    import onnx

    dims = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    return int(dims[2].dim_value), int(dims[3].dim_value)


def main_export(argv: list[str] | None = None) -> int:
    """reid-ray export --checkpoint C --onnx OUT.onnx [--net NAME]"""
    from reid_ray.cli import run_cli

    p = argparse.ArgumentParser(
        prog="reid-ray export",
        description="Write a checkpoint's retrieval embedder (backbone + BNNeck feature, L2-normalised, what "
                    "evaluation ranks by) as ONNX. Input 'images': float32 (N, 3, H, W) at the checkpoint's "
                    "image size (transform.height x width), RGB scaled to [0, 1] then normalised with the ImageNet "
                    "mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225) -- the caller applies that, the graph "
                    "does not; output 'features': float32 (N, D); N is dynamic. The file's metadata holds the "
                    "mean, std, size and the checkpoint's sha256 (model_digest).")
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--onnx", required=True, help="the .onnx file to write (replaced atomically)")
    p.add_argument("--net", default=None, help="which network of a multi-network checkpoint (default: the one its "
                                               "evaluation reports, e.g. MMT's best mean net)")
    p.add_argument("--no-check", action="store_true", help="skip comparing onnxruntime's features with torch's")
    args = p.parse_args(argv)

    def _run(a) -> int:
        _require("export", "onnx", "onnxscript", "onnxruntime")
        storage.check_file(a.onnx, "--onnx", writes=True)  # a wrong path fails before the checkpoint loads
        emb = load_embedder(a.checkpoint, a.net)
        t0 = time.perf_counter()
        res = export_onnx(emb, a.onnx, check=not a.no_check)
        hh, ww = emb.size
        check = "" if a.no_check else f"; onnxruntime = torch to {res['max_abs_diff']:.1e}"
        print(f"wrote {res['path']} ({emb.method} {emb.network}, input images (N, 3, {hh}, {ww}) ImageNet-normalised, "
              f"output features (N, {emb.dim}) L2-normalised; {res['exporter']} exporter, "
              f"{time.perf_counter() - t0:.1f} s{check})")
        return 0

    return run_cli(_run, args)


# --------------------------------------------------------------------------- reid-ray embed

def list_images(folder: str | Path) -> tuple[Path, list[Path]]:
    """(the folder, its jpg/jpeg/png files at any depth, sorted by their path inside it)."""
    root = Path(folder).expanduser()
    storage.check_folder(str(folder), "--images")
    if not root.is_dir():
        raise ReidRayError(f"--images {folder}: no such folder; pass a folder of .jpg/.jpeg/.png images")
    files = sorted((p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
                   key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise ReidRayError(f"--images {folder}: no .jpg, .jpeg or .png images in it (nor in its subfolders); pass "
                           "the folder that holds them")
    return root, files


class _FolderImages:
    """A folder's images through the checkpoint's test transform (loader processes included); an unreadable
    image comes back as its error, raised in the main process as one line."""

    def __init__(self, files: list[Path], transform, size: tuple[int, int]):
        self.files, self.transform, self.size = [str(f) for f in files], transform, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        import torch

        from reid_ray.data.loader import ImageDataset

        try:
            return {"img": self.transform(ImageDataset._load(self.files[i])), "error": ""}
        except ReidRayError as e:
            return {"img": torch.zeros(3, *self.size), "error": f"--images: {e}"}


def _loader(files: list[Path], emb: Embedder, batch_size: int | None):
    from torch.utils.data import DataLoader

    from reid_ray.data.loader import loader_kwargs
    from reid_ray.data.transforms import test_transform

    lcfg = dataclasses.replace(emb.cfg.loader, in_memory=False)  # decoded in the loader processes, never held
    kw = loader_kwargs(lcfg)
    kw.pop("persistent_workers", None)
    ds = _FolderImages(files, test_transform(emb.cfg.transform), emb.size)
    return DataLoader(ds, batch_size=batch_size or lcfg.test_batch_size, shuffle=False, **kw)


def _progress():
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    # on a terminal (stderr); a log or a pipe gets no bar, so stderr holds only what went wrong
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=console, disable=not console.is_terminal)


def embed_folder(emb: Embedder, images: str | Path, out: str | Path, *, batch_size: int | None = None,
                 device: torch.device | str = "cpu", progress: bool = True) -> dict:
    """Embed every image of a folder (`list_images`) into a Parquet file, written atomically: columns `path`
    (inside the folder, '/'-separated), `feature` (fixed-size list of D float32, L2-normalised BN features)
    and `model_digest` (the checkpoint's sha256); the schema's metadata repeats it, with the checkpoint,
    network and preprocessing (`metadata`). Returns {"path", "images", "dim"}."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    root, files = list_images(images)
    out = Path(out).expanduser()
    if not out.parent.is_dir():
        raise ReidRayError(f"--out {out}: folder {out.parent} does not exist; create it or pick another path")
    if batch_size is not None and batch_size < 1:
        raise ReidRayError(f"--batch-size {batch_size}: must be at least 1")
    device = torch.device(device)
    model = retrieval_module(emb.net).to(device).eval()
    dim = emb.dim
    schema = pa.schema([("path", pa.string()), ("feature", pa.list_(pa.float32(), dim)), ("model_digest", pa.string())],
                       metadata={**metadata(emb), "images": str(root.resolve())})
    rel = [f.relative_to(root).as_posix() for f in files]
    done = 0
    bar = _progress()
    with atomic_path(out) as tmp, pq.ParquetWriter(str(tmp), schema) as writer, bar, torch.no_grad():
        task = bar.add_task(f"embedding {root}", total=len(files), visible=progress)
        try:
            for batch in _loader(files, emb, batch_size):
                bad = next((e for e in batch["error"] if e), None)
                if bad:
                    raise ReidRayError(bad)
                f = model(batch["img"].to(device, non_blocking=True)).float().cpu().numpy()
                n = len(f)
                feature = pa.FixedSizeListArray.from_arrays(pa.array(f.reshape(-1), pa.float32()), dim)
                writer.write_batch(pa.record_batch([pa.array(rel[done:done + n], pa.string()), feature,
                                                    pa.array([emb.digest] * n, pa.string())], schema=schema))
                done += n
                bar.advance(task, n)
        except BaseException:
            bar.live.transient = True  # the error alone, on one line
            raise
    return {"path": out, "images": done, "dim": dim}


def main_embed(argv: list[str] | None = None) -> int:
    """reid-ray embed --checkpoint C --images DIR --out feats.parquet"""
    from reid_ray.cli import run_cli

    p = argparse.ArgumentParser(
        prog="reid-ray embed",
        description="Embed every .jpg/.jpeg/.png image of a folder (recursively, sorted) with a checkpoint's "
                    "retrieval network (its test transform; L2-normalised BNNeck features, what evaluation ranks "
                    "by) into a Parquet file: columns path (inside the folder), feature (D float32) and "
                    "model_digest (the checkpoint's sha256, also in the schema's metadata).")
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--images", required=True, help="folder of images (searched recursively)")
    p.add_argument("--out", required=True, help="the .parquet file to write (replaced atomically)")
    p.add_argument("--net", default=None, help="which network of a multi-network checkpoint (default: the one its "
                                               "evaluation reports)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the checkpoint's loader.test_batch_size")
    p.add_argument("--device", default="auto", help="auto (a CUDA GPU when there is one), cpu, cuda, cuda:N")
    args = p.parse_args(argv)

    def _run(a) -> int:
        device = pick_device(a.device)
        list_images(a.images)  # a wrong folder or file fails before the checkpoint loads
        storage.check_file(a.out, "--out", writes=True)
        emb = load_embedder(a.checkpoint, a.net, device)
        t0 = time.perf_counter()
        res = embed_folder(emb, a.images, a.out, batch_size=a.batch_size, device=device)
        print(f"wrote {res['path']}: {res['images']} images x {res['dim']} features ({emb.method} {emb.network}, "
              f"model_digest {emb.digest[:12]}..., {time.perf_counter() - t0:.1f} s)")
        return 0

    return run_cli(_run, args)


# --------------------------------------------------------------------------- reid-ray evaluate

def evaluate_checkpoint(emb: Embedder, dataset: str, data_root: str | Path, *, rerank: bool = False,
                        device: torch.device | str = "cpu", k1: int = 20, k2: int = 6, lambda_value: float = 0.3) -> dict:
    """{"dataset", "query", "gallery", "plain": metrics[, "rerank": metrics]}, each metrics as
    `engine.evaluate_model` gives them (mAP, R1, R5, R10 in %, cmc) on the dataset's query/gallery;
    "rerank" after k-reciprocal re-ranking (`evaluation.re_ranking`) of the same features' distances."""
    import torch

    from reid_ray.data.readers import read_dataset
    from reid_ray.training.loop import query_gallery_features, rank_metrics
    from reid_ray.evaluation import pairwise_distance, re_ranking

    ds = read_dataset(dataset, data_root)
    cfg = dataclasses.replace(emb.cfg, loader=dataclasses.replace(emb.cfg.loader, in_memory=False))
    out = {"dataset": ds.name, "query": ds.split("query").num_rows, "gallery": ds.split("gallery").num_rows}
    (qf, qp, qc), (gf, gp, gc) = query_gallery_features(emb.net, ds, cfg, torch.device(device))
    qg = pairwise_distance(qf, gf)
    out["plain"] = rank_metrics(qg, qp, gp, qc, gc)  # = engine.evaluate_model, from the same features
    if rerank:
        out["rerank"] = rank_metrics(re_ranking(qg, pairwise_distance(qf, qf), pairwise_distance(gf, gf), k1, k2,
                                                lambda_value), qp, gp, qc, gc)
    return out


def results_table(emb: Embedder, res: dict, k1: int = 20, k2: int = 6, lambda_value: float = 0.3):
    from rich.table import Table

    table = Table(title=f"{emb.method} ({emb.network}) on {res['dataset']}: {res['query']} queries, "
                        f"{res['gallery']} gallery images")
    for col in ("ranking", "mAP", "R1", "R5", "R10"):
        table.add_column(col, justify="left" if col == "ranking" else "right")
    rows = [("plain", res["plain"])]
    if "rerank" in res:
        rows.append((f"re-ranked (k1={k1}, k2={k2}, λ={lambda_value})", res["rerank"]))
    for label, m in rows:
        table.add_row(label, *(f"{m[k]:.1f}" for k in ("mAP", "R1", "R5", "R10")))
    return table


def main_evaluate(argv: list[str] | None = None) -> int:
    """reid-ray evaluate --checkpoint C --dataset NAME --data-root R [--rerank]"""
    from reid_ray.cli import run_cli

    p = argparse.ArgumentParser(
        prog="reid-ray evaluate",
        description="mAP and CMC (R1, R5, R10; Market-1501's protocol) of a checkpoint's retrieval network on a "
                    "dataset's query/gallery split, as training evaluates (engine.evaluate_model); --rerank adds "
                    "the k-reciprocal re-ranked figures.")
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--dataset", required=True, help="market1501, dukemtmc, msmt17 (msmt17-all), cuhk03np (cuhk03np-detected), "
                                                    "synth-a, synth-b")
    p.add_argument("--data-root", required=True, help="folder that holds the dataset's own top folder")
    p.add_argument("--rerank", action="store_true", help="also k-reciprocal re-ranking (k1=20, k2=6, lambda=0.3)")
    p.add_argument("--net", default=None, help="which network of a multi-network checkpoint (default: the one its "
                                               "evaluation reports)")
    p.add_argument("--device", default="auto", help="auto (a CUDA GPU when there is one), cpu, cuda, cuda:N")
    args = p.parse_args(argv)

    def _run(a) -> int:
        from rich.console import Console

        from reid_ray.data.readers import read_dataset

        device = pick_device(a.device)
        read_dataset(a.dataset, a.data_root)  # a wrong name or root fails before the checkpoint loads
        emb = load_embedder(a.checkpoint, a.net, device)
        res = evaluate_checkpoint(emb, a.dataset, a.data_root, rerank=a.rerank, device=device)
        console = Console()
        console.print(results_table(emb, res))
        console.print(f"checkpoint {emb.path} (sha256 {emb.digest[:12]}...)")
        return 0

    return run_cli(_run, args)


COMMANDS = {
    "export": (main_export, "write a checkpoint's retrieval embedder (backbone + BNNeck, L2-normalised) as ONNX"),
    "embed": (main_embed, "embed every image of a folder with a checkpoint into a Parquet file (path, feature)"),
    "evaluate": (main_evaluate, "mAP and CMC (R1/R5/R10) of a checkpoint on a dataset, optionally re-ranked"),
}


if __name__ == "__main__":  # python -m reid_ray.export export|embed|evaluate ...
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(f"usage: python -m reid_ray.export {{{','.join(COMMANDS)}}} ...", file=sys.stderr)
        sys.exit(2)
    sys.exit(COMMANDS[sys.argv[1]][0](sys.argv[2:]))
