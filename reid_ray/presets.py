"""Real-dataset presets: the papers' settings for each source -> target pair.

    python -m reid_ray.tune --method mmt --preset duke2market --data-root /data
    python -m reid_ray.train --method ecn --preset market2duke --data-root /data

    >>> source, target, overrides = apply_preset("duke2market", "mmt")
    >>> source, target, overrides["params.num_clusters"]
    ('dukemtmc', 'market1501', 500)

A preset is {"source", "target", "overrides" (config keys for every method), "method_overrides"
(per method: its params.* and, where its paper trains differently, epochs / optim.*), "published"
(the paper's numbers each method should approach; not yet reproduced here)}. Overrides apply after
the method's defaults and before `--set` flags, so any value stays overridable.

Shared settings (MMT, ECN and MAR all use them): ResNet-50 from ImageNet weights, 256×128 images,
P×K = 16 identities × 4 images per batch, MMT's source pretraining of 80 epochs. MMT's k follows
its paper: 500 clusters for a Market target, 700 for Duke, 1500 for MSMT17 (MMT-500/700/1500).
"""

from __future__ import annotations

import copy

from reid_ray import ReidRayError

_COMMON = {
    "model.arch": "resnet50",
    "model.pretrained": "imagenet",     # offline nodes: --set model.pretrained=/path/resnet50.pth
    "transform.height": 256,
    "transform.width": 128,
    "loader.num_identities": 16,        # P
    "loader.num_instances": 4,          # K
    "optim.lr": 3.5e-4,
    "pretrain_epochs": 80,              # MMT's source pretraining (its Sec. 4.2)
}

# MMT (Ge et al., ICLR 2020): Adam 3.5e-4, 40 epochs × 400 iterations, α = 0.999, λ_id = 0.5, λ_tri = 0.8.
_MMT = {"epochs": 40, "params.iters": 400, "params.alpha": 0.999, "params.soft_ce_weight": 0.5,
        "params.soft_tri_weight": 0.8}
# ECN (Zhong et al., CVPR 2019): β = 0.05 (temperature), λ = 0.3 (source vs invariance), k = 6 neighbours,
# target batch 128, 60 epochs with the lr ÷10 after 40 (the shared milestones). The optimiser stays
# methods/ecn.py's choice (Adam from the source model, not the paper's SGD with 10× on new layers).
_ECN = {"params.beta": 0.05, "params.lam": 0.3, "params.knn_k": 6, "params.target_batch": 128, "epochs": 60}
# MAR (Yu et al., CVPR 2019): mining ratio 0.5%, agent scale 30, λ1 = 2e-4 (CML), λ2 = 50 (AL + β·RJ), margin 1.
_MAR = {"params.mining_ratio": 0.005, "params.scale": 30.0, "params.lamb_1": 2e-4, "params.lamb_2": 50.0,
        "params.beta": 0.2, "params.margin": 1.0}

_MMT_PAPER = "Ge et al., Mutual Mean-Teaching, ICLR 2020 (ResNet-50)"
_ECN_PAPER = "Zhong et al., Invariance Matters (ECN), CVPR 2019"
_MAR_PAPER = "Yu et al., Soft Multilabel Learning (MAR), CVPR 2019"


def _preset(source: str, target: str, k: int, published: dict) -> dict:
    return {
        "source": source,
        "target": target,
        "overrides": dict(_COMMON),
        "method_overrides": {"mmt": {**_MMT, "params.num_clusters": k}, "ecn": dict(_ECN), "mar": dict(_MAR)},
        "published": published,
    }


PRESETS: dict[str, dict] = {
    "duke2market": _preset("dukemtmc", "market1501", 500, {
        "mmt": {"mAP": 71.2, "R1": 87.7, "paper": _MMT_PAPER + ", MMT-500"},
        "ecn": {"mAP": 43.0, "R1": 75.1, "paper": _ECN_PAPER},
    }),
    "market2duke": _preset("market1501", "dukemtmc", 700, {
        "mmt": {"mAP": 65.1, "R1": 78.0, "paper": _MMT_PAPER + ", MMT-700"},
        "ecn": {"mAP": 40.4, "R1": 63.3, "paper": _ECN_PAPER},
    }),
    "market2msmt": _preset("market1501", "msmt17", 1500, {
        "mmt": {"mAP": 22.9, "R1": 49.2, "paper": _MMT_PAPER + ", MMT-1500"},
        "ecn": {"mAP": 8.5, "R1": 25.3, "paper": _ECN_PAPER},
    }),
    "msmt2market": _preset("msmt17", "market1501", 500, {
        "mar": {"mAP": 40.0, "R1": 67.7, "paper": _MAR_PAPER},
    }),
}

# Long names with the datasets' own names: dukemtmc2market1501, dukemtmc->market1501.
ALIASES = {f"{p['source']}{sep}{p['target']}": name for name, p in PRESETS.items() for sep in ("2", "->")}


def preset_names() -> list[str]:
    return sorted(PRESETS)


def resolve_preset(name: str) -> dict:
    """The preset called `name` (short `duke2market`, or `dukemtmc2market1501` / `dukemtmc->market1501`)."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in PRESETS:
        raise ReidRayError(f"unknown preset {name!r}; valid presets: {', '.join(preset_names())} "
                           f"(or source2target with dataset names, e.g. dukemtmc2market1501)")
    return copy.deepcopy(PRESETS[key])


def apply_preset(name: str, method: str) -> tuple[str, str, dict]:
    """(source, target, overrides) for `--preset name` with `method`: shared keys, then the method's own.

    A method without its own entry (the baseline: direct transfer) gets the shared settings only.
    """
    p = resolve_preset(name)
    return p["source"], p["target"], {**p["overrides"], **p["method_overrides"].get(method, {})}
