"""A checkpoint's embedder as ONNX (`reid-ray export`): input `images` (N, 3, H, W), normalised as
`inference.embedder` says, output `features` (N, D) L2-normalised, N dynamic; checked against torch."""

from __future__ import annotations

import contextlib
import copy
import io
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from reid_ray import ReidRayError, atomic_path
from reid_ray.inference.embedder import Embedder, metadata, retrieval_module

if TYPE_CHECKING:
    import torch
    from torch import nn

ONNX_MODULES = ("onnx", "onnxscript", "onnxruntime")
INSTALL_HINT = "pip install -e '.[export]'"


def require_onnx(command: str = "export") -> None:
    """The ONNX packages (an optional extra), or one error naming the missing ones and how to install them."""
    import importlib

    missing = []
    for m in ONNX_MODULES:
        try:
            importlib.import_module(m)
        except ImportError:
            missing.append(m)
    if missing:
        raise ReidRayError(f"reid-ray {command} needs {', '.join(ONNX_MODULES)}; not installed: {', '.join(missing)}. "
                           f"Install them with {INSTALL_HINT}")


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
    """Write `emb` as ONNX to `out` (atomically): input `images` (N, 3, H, W) normalised as
    `inference.embedder` says, output `features` (N, D) L2-normalised, N dynamic. `check`: onnxruntime's
    features of a random batch of 3 against torch's. Returns {"path", "exporter", "max_abs_diff"}."""
    require_onnx()
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
