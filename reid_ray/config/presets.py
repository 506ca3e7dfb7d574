"""Real-dataset presets: the papers' settings for each source -> target pair.

    python -m reid_ray.tune --method <method> --preset duke2market --data-root /data
    python -m reid_ray.train --method <method> --preset market2duke --data-root /data
    python -m reid_ray.train --method cluster_contrast --preset market --data-root /data   # no source

    >>> source, target, overrides = apply_preset("duke2market", "baseline")
    >>> source, target, overrides["model.arch"]
    ('dukemtmc', 'market1501', 'resnet50')

A preset here names its datasets and the settings every method shares. What a method's paper
trains with on that pair (its own parameters and, where it differs, epochs / optim.*) and the
numbers it published live in the method's own file (`Method.presets`, `Method.published`);
`resolve_preset` puts both together. A preset is applied after the method's defaults and before
`--config`, flags and `--set`, so every value stays overridable (schema.py has the whole order).

Shared settings: ResNet-50 from ImageNet weights, 256×128 images, P×K = 16 identities × 4 images
per batch, 80 epochs of source pretraining for the methods that start from a source model.

The fully unsupervised presets (`market`, `msmt17`) name no source (`--source none`): the target alone, from
ImageNet weights, for the methods that define that setting (`Method.unsupervised`).
"""

from __future__ import annotations

import copy

from reid_ray import ReidRayError
from reid_ray.data.domains import NO_SOURCE

_COMMON = {
    "model.arch": "resnet50",
    "model.pretrained": "imagenet",     # offline nodes: --set model.pretrained=/path/resnet50.pth
    "transform.height": 256,
    "transform.width": 128,
    "loader.num_identities": 16,        # P
    "loader.num_instances": 4,          # K
    "optim.lr": 3.5e-4,
    "pretrain_epochs": 80,              # the source model's training, when a method starts from one
}

_PAIRS = {
    "duke2market": ("dukemtmc", "market1501"),
    "market2duke": ("market1501", "dukemtmc"),
    "market2msmt": ("market1501", "msmt17"),
    "msmt2market": ("msmt17", "market1501"),
    # the fully unsupervised setting: no source
    "market": (NO_SOURCE, "market1501"),
    "msmt17": (NO_SOURCE, "msmt17"),
}

# Long names with the datasets' own names: dukemtmc2market1501, dukemtmc->market1501; market1501 for market.
ALIASES = {f"{s}{sep}{t}": name for name, (s, t) in _PAIRS.items() for sep in ("2", "->") if s != NO_SOURCE}
ALIASES.update({"market1501": "market", "msmt": "msmt17"})


def preset_names() -> list[str]:
    return sorted(_PAIRS)


def _canonical(name: str) -> str:
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in _PAIRS:
        raise ReidRayError(f"unknown preset {name!r}; valid presets: {', '.join(preset_names())} "
                           f"(or source2target with dataset names, e.g. dukemtmc2market1501; market and msmt17 "
                           f"have no source)")
    return key


def resolve_preset(name: str) -> dict:
    """The preset called `name` (short `duke2market`, or `dukemtmc2market1501` / `dukemtmc->market1501`):
    {"source", "target", "overrides" (shared), "method_overrides" and "published" (per registered method)}."""
    from reid_ray.methods import METHODS

    key = _canonical(name)
    source, target = _PAIRS[key]
    return {"source": source, "target": target, "overrides": copy.deepcopy(_COMMON),
            "method_overrides": {m: dict(cls.presets[key]) for m, cls in METHODS.items() if key in cls.presets},
            "published": {m: dict(cls.published[key]) for m, cls in METHODS.items() if key in cls.published}}


def apply_preset(name: str, method) -> tuple[str, str, dict]:
    """(source, target, overrides) for `--preset name` with `method` (a name or a Method class): the
    shared keys, then the method's own. A method without its own entry gets the shared settings only."""
    from reid_ray.methods import method_class

    key = _canonical(name)
    cls = method_class(method) if isinstance(method, str) else method
    source, target = _PAIRS[key]
    return source, target, {**_COMMON, **cls.presets.get(key, {})}
