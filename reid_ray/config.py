"""One typed config per run: defaults < synthetic-demo defaults < search space < CLI flags < Tune sample.

    >>> cfg = TrainConfig(method="baseline")
    >>> cfg = apply_overrides(cfg, ["model.arch=resnet18", "lr=1e-4"])   # dotted path or unique leaf name
    >>> flatten(cfg)["optim.lr"]
    0.0001

Names are the papers' names, documented once where they are defined.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from typing import Any

from reid_ray import ReidRayError
from reid_ray.data.loader import LoaderConfig
from reid_ray.data.transforms import TransformConfig
from reid_ray.models.reid_net import ModelConfig


@dataclass
class OptimConfig:
    """BoT's schedule: Adam, linear warmup from warmup_factor×lr over warmup_epochs, then step decay."""

    optimizer: str = "adam"            # adam | sgd
    lr: float = 3.5e-4
    weight_decay: float = 5e-4
    warmup_epochs: int = 10
    warmup_factor: float = 0.1
    milestones: tuple[int, ...] = (40, 70)
    gamma: float = 0.1


@dataclass
class TrainConfig:
    method: str = "baseline"
    source: str = "synth-a"
    target: str = "synth-b"
    data_root: str = "data"
    epochs: int = 120
    eval_every: int = 10
    eval_source: bool = True           # source test set at every evaluation; False: at the last epoch only (sweeps)
    seed: int = 0
    workers: int = 2
    use_gpu: str = "auto"              # auto | true | false
    gpu_wait_s: float = 900            # use_gpu=true on an autoscaling cluster: wait this long for GPU nodes
    amp: bool = True                   # mixed precision (GPU only)
    max_failures: int = 2              # worker failures tolerated (resume from the last checkpoint)
    output: str = "outputs"
    resume: str = ""
    init: str = ""                     # UDA methods: source-trained baseline checkpoint to start from
    pretrain_epochs: int = 0           # epochs of that source training when no --init (0: the baseline's)
    clustering: str = "actor"          # actor (the PseudoLabeler Ray actor) | local (rank 0, in-process)
    mlflow_uri: str = ""
    experiment: str = ""               # MLflow experiment; default "<source>-><target>"
    name: str = ""                     # run name; default "<method>-<time>"
    model: ModelConfig = field(default_factory=ModelConfig)
    transform: TransformConfig = field(default_factory=TransformConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    params: dict[str, Any] = field(default_factory=dict)  # the method's own hyperparameters (see its file)


# The embedded default: small images, a small backbone and a schedule that fits minutes on 2 CPU cores.
SYNTHETIC_DEFAULTS = {
    "epochs": 20, "eval_every": 5,
    "model.arch": "small",
    "transform.height": 64, "transform.width": 32, "transform.pad": 4,
    "loader.in_memory": True,
    "optim.warmup_epochs": 3, "optim.milestones": (12, 17),
}


def _fields(obj) -> dict[str, Any]:
    return {f.name: f for f in dataclasses.fields(obj)}


def flatten(cfg, prefix: str = "") -> dict[str, Any]:
    """Dotted names -> values, for MLflow params and `--set` key listings."""
    out = {}
    for name in _fields(cfg):
        value = getattr(cfg, name)
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(value):
            out.update(flatten(value, key + "."))
        elif isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


def valid_keys(cfg) -> list[str]:
    return sorted(flatten(cfg))


def _coerce(value: Any, typ: Any, key: str) -> Any:
    if not isinstance(value, str):
        return tuple(value) if typing.get_origin(typ) is tuple else value
    try:
        if typ is bool:
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return value.lower() in ("true", "1", "yes")
        if typ in (int, float, str):
            return typ(value)
        if typing.get_origin(typ) is tuple:
            inner = typing.get_args(typ)[0]
            return tuple(inner(v) for v in value.strip("()[] ").split(",") if v.strip())
        return json.loads(value)
    except (ValueError, TypeError, json.JSONDecodeError):
        raise ReidRayError(f"--set {key}={value}: expected {getattr(typ, '__name__', typ)}") from None


def _resolve(cfg, key: str) -> str:
    keys = valid_keys(cfg)
    if key in keys or key.startswith("params."):
        return key
    matches = [k for k in keys if k.rsplit(".", 1)[-1] == key]
    if len(matches) == 1:
        return matches[0]
    hint = f"ambiguous: {', '.join(matches)}" if matches else f"valid keys: {', '.join(keys)}"
    raise ReidRayError(f"unknown config key {key!r} ({hint})")


def set_value(cfg, key: str, value: Any) -> None:
    """Set a dotted key (or unique leaf name) in place, converting strings to the field's type."""
    path = _resolve(cfg, key).split(".")
    obj = cfg
    for part in path[:-1]:
        obj = getattr(obj, part)
    if isinstance(obj, dict):
        old = obj.get(path[-1])
        obj[path[-1]] = _coerce(value, type(old), key) if old is not None else value
        return
    hints = typing.get_type_hints(type(obj))
    setattr(obj, path[-1], _coerce(value, hints[path[-1]], key))


def apply_overrides(cfg, items: list[str] | dict[str, Any]):
    """Apply `key=value` strings (CLI `--set`) or a {key: value} mapping (a Tune sample)."""
    pairs = items.items() if isinstance(items, dict) else [_split(s) for s in items]
    for k, v in pairs:
        set_value(cfg, k, v)
    return cfg


def _split(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise ReidRayError(f"--set {item!r}: expected key=value, e.g. --set optim.lr=1e-4")
    k, v = item.split("=", 1)
    return k.strip(), v.strip()


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(d: dict) -> TrainConfig:
    sub = {"model": ModelConfig, "transform": TransformConfig, "loader": LoaderConfig, "optim": OptimConfig}
    kwargs = {k: (sub[k](**{kk: tuple(vv) if isinstance(vv, list) else vv for kk, vv in v.items()})
                  if k in sub else v) for k, v in d.items()}
    return TrainConfig(**kwargs)
