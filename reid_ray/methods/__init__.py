"""UDA re-ID methods: one file each. Adding a method = one file + its search space YAML.

Each file registers its class with `@register_method`; `METHODS` is the plain dict they fill. A
method outside this package (a user's own file) registers the same way: import its module before
resolving the config (`reid_ray.train.main` and the Ray workers import `Method.__module__`), or name
it in `REID_RAY_METHODS=package.module[,other.module]` so the CLIs import it first.
"""

import importlib
import os

from reid_ray.methods import baseline, cluster_contrast, ecn, mar, mmt, san, self_training, spcl  # noqa: F401  (each registers)
from reid_ray.methods.base import (
    METHODS,
    Domains,
    EpochContext,
    Method,
    gather_batch,
    method_class,
    register_method,
    unwrap,
)

for _module in filter(None, (m.strip() for m in os.environ.get("REID_RAY_METHODS", "").split(","))):
    importlib.import_module(_module)

__all__ = ["METHODS", "Method", "Domains", "EpochContext", "method_class", "register_method", "unwrap", "gather_batch"]
