"""A trained embedder out of any reid-ray checkpoint: what `reid-ray export`, `embed` and `evaluate` run.

`--checkpoint` is any checkpoint reid-ray writes: a Ray Train checkpoint folder (its checkpoint.pt), a run's
best.pt, a cached source model outputs/pretrain/baseline-*.pt; a folder holding checkpoint.pt or best.pt.

The embedder is what evaluation measures: the network in eval mode (backbone -> global average pooling ->
BNNeck), its BN feature f_i, L2-normalised (`evaluation.extract_features`), so the dot product of two
features is their cosine similarity and 2 - 2·dot their squared distance, the one evaluation ranks by.
Its input is the checkpoint's test transform: RGB resized to the config's height × width, scaled to
[0, 1], then normalised with the ImageNet mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225),
NCHW float32. The ONNX graph does not fold that normalisation in: a caller applies it (the ONNX file's
metadata holds the mean, std and size), exactly as `reid-ray embed` does.

The network: a method with one re-ID network exports it. One with several (e.g. two networks and their two
mean networks) exports the one its evaluation reports, the first it evaluates (`Method.eval_model`, never
picked by its score on the test labels, `training.loop.evaluate_method`); `--net NAME` picks any other (the
error for a wrong name lists them). Which networks a checkpoint holds, and their names, the method that
wrote it says (`Method.retrieval_networks`); the file itself is read through `training.checkpoint`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

from reid_ray import ReidRayError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from reid_ray.config import TrainConfig

# torch, torchvision and the data package load when a command runs: the CLI's help stays instant

CHECKPOINT_HELP = "a checkpoint.pt, a run's best.pt, a cached outputs/pretrain/baseline-*.pt, or a folder holding one"


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
    cfg: TrainConfig              # the checkpoint's model, transform and loader sections
    method: str                   # the method that trained it
    network: str                  # which of the checkpoint's networks (e.g. "net", "mean_net2")
    networks: list[str]           # every network the checkpoint holds, the evaluated one first
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


def checkpoint_networks(path: Path, method: str, method_state: dict) -> dict[str, dict]:
    """{name: ReIDNet state dict} of a checkpoint's re-ID networks, the evaluated one first, as the method that
    wrote it reads its own state (`Method.retrieval_networks`)."""
    from reid_ray.methods import method_class

    try:
        cls = method_class(method)
    except ReidRayError as e:  # a method of the user's own that this process has not imported
        raise ReidRayError(f"--checkpoint {path}: written by {e}; a method of your own is read once its module is "
                           "named in REID_RAY_METHODS=package.module") from None
    try:
        nets = cls.retrieval_networks(method_state)
    except ReidRayError as e:
        raise ReidRayError(f"--checkpoint {path}: not the layout a {method} checkpoint has: {e}; pass a checkpoint "
                           "written by reid-ray train") from None
    if not nets or not all(isinstance(s, dict) for s in nets.values()):
        raise ReidRayError(f"--checkpoint {path}: holds no re-ID network (backbone + BNNeck) to embed with; pass "
                           "a checkpoint written by reid-ray train")
    return nets


def _embedder_config(path: Path, config: dict) -> TrainConfig:
    from reid_ray.config import from_dict

    try:  # the sections the embedder needs: any method's checkpoint reads, a user's own method included
        return from_dict({k: config[k] for k in ("model", "transform", "loader") if k in config})
    except ReidRayError as e:
        raise ReidRayError(f"--checkpoint {path}: its config does not fit this reid-ray ({e}); export it with "
                           "the reid-ray version that trained it") from None


def load_embedder(checkpoint: str | Path, net: str | None = None, device: str | torch.device = "cpu") -> Embedder:
    """The retrieval network of a reid-ray checkpoint (see the module's docstring for which), in eval mode."""
    from torch import nn

    from reid_ray.models.reid_net import ReIDNet
    from reid_ray.training.checkpoint import read_checkpoint

    path = checkpoint_file(checkpoint)
    config, method_state = read_checkpoint(path, "--checkpoint")
    cfg, method = _embedder_config(path, config), config["method"]
    nets = checkpoint_networks(path, method, method_state)
    name = net or next(iter(nets))  # the network evaluation reports (training.loop.evaluate_method)
    if name not in nets:
        raise ReidRayError(f"--net {name}: the {method} checkpoint has no such network; valid: {', '.join(nets)}")
    weights = nets[name]
    model_cfg = dataclasses.replace(cfg.model, pretrained="none")  # the checkpoint holds every weight
    try:
        classifier = weights.get("classifier.weight")
        model = ReIDNet(model_cfg, int(classifier.shape[0]) if classifier is not None else 1)
        if classifier is None:  # a method that classifies against a memory keeps no classifier in its network
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


def metadata(emb: Embedder) -> dict[str, str]:
    """What a caller needs beside the graph (ONNX metadata_props, the Parquet schema's metadata)."""
    from reid_ray.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    h, w = emb.size
    return {"model_digest": emb.digest, "checkpoint": str(emb.path), "method": emb.method, "network": emb.network,
            "feature": f"L2-normalised BNNeck feature (eval mode), {emb.dim} floats; cosine similarity = dot product",
            "input": f"RGB NCHW float32, 3x{h}x{w}: resized to {h}x{w}, scaled to [0, 1], then (x - mean) / std",
            "mean": ",".join(map(str, IMAGENET_MEAN)), "std": ",".join(map(str, IMAGENET_STD)),
            "height": str(h), "width": str(w)}
