"""UDA re-ID methods: one file each. Adding a method = one file + its search space YAML."""

from reid_ray.methods.base import Domains, EpochContext, Method
from reid_ray.methods.baseline import Baseline
from reid_ray.methods.ecn import ECN
from reid_ray.methods.mar import MAR
from reid_ray.methods.mmt import MMT
from reid_ray.methods.san import SAN

METHODS: dict[str, type[Method]] = {
    "baseline": Baseline,
    "ecn": ECN,
    "mmt": MMT,
    "mar": MAR,
    "san": SAN,
}

__all__ = ["METHODS", "Method", "Domains", "EpochContext"]
