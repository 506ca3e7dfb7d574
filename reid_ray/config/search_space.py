"""Search spaces: `search_spaces/<method>.yaml` (embedded benchmark) and `search_spaces/real/<method>.yaml`
(real benchmarks, picked by `--preset` or a real dataset), read and checked without Ray.

    # a method's file names its parameters; search_spaces/ holds one space per method
    params:
      params.k: {distribution: int, low: 60, high: 150}
      params.momentum: {distribution: uniform, low: 0.95, high: 0.999}
      optim.lr: {distribution: loguniform, low: 1.0e-4, high: 1.0e-3}
      model.arch: {distribution: choice, values: [small, resnet18]}
    fixed:            # optional: config overrides every trial shares
      epochs: 8

Parameter names are config keys (`reid_ray.config`: dotted paths such as `optim.lr`, or a
method's own `params.<name>`). Distributions: uniform, loguniform (low > 0), int (low..high
inclusive), choice (values). A mistake names the file, the line and the valid names.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from reid_ray import ReidRayError
from reid_ray.config import TrainConfig, apply_overrides, valid_keys

DISTRIBUTIONS = ("uniform", "loguniform", "int", "choice")
# the top-level search_spaces/ of a source tree (through the link reid_ray/search_spaces), or the copy a wheel holds
SEARCH_SPACE_DIR = Path(__file__).resolve().parents[1] / "search_spaces"


@dataclass
class Param:
    name: str
    distribution: str
    low: float | int | None = None
    high: float | int | None = None
    values: list | None = None
    line: int = 0

    def describe(self) -> str:
        if self.distribution == "choice":
            return f"choice{self.values}"
        return f"{self.distribution}[{self.low}, {self.high}]"


@dataclass
class SearchSpace:
    path: str
    params: dict[str, Param]
    fixed: dict[str, Any]
    text: str


def default_path(method: str, real: bool = False, preset: str | None = None) -> Path:
    """`search_spaces/<method>.yaml` (the embedded benchmark's ranges), or, at the real benchmarks' scale (a
    `--preset` or a real dataset), `search_spaces/real/<method>-<preset>.yaml` where one exists (a target
    whose scale differs, e.g. MSMT17's 4,101 identities), else `search_spaces/real/<method>.yaml`."""
    for name in ([f"{method}-{preset}"] if preset else []) + [method]:
        path = SEARCH_SPACE_DIR / "real" / f"{name}.yaml"
        if real and path.is_file():
            return path
    return SEARCH_SPACE_DIR / f"{method}.yaml"


def load_search_space(path: str | Path, cfg: TrainConfig) -> SearchSpace:
    """Read and validate a search space against the run's config (its method's parameters)."""
    path = Path(path)
    if path.is_dir():
        raise ReidRayError(f"search space {path}: a folder, not a file; pass a search space YAML (the shipped ones "
                           f"are in {SEARCH_SPACE_DIR})")
    if not path.is_file():
        raise ReidRayError(f"search space {path}: no such file (the shipped ones are in {SEARCH_SPACE_DIR})")
    text = path.read_text()
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ReidRayError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if root is None or not isinstance(root, yaml.MappingNode):
        raise ReidRayError(f"{path}: expected a mapping with a 'params:' section (see {default_path('baseline')})")
    sections = {k.value: v for k, v in root.value}
    unknown = set(sections) - {"params", "fixed"}
    if unknown:
        raise ReidRayError(f"{path}: unknown section(s) {sorted(unknown)}; valid: params, fixed")
    if "params" not in sections or not isinstance(sections["params"], yaml.MappingNode):
        raise ReidRayError(f"{path}: expected a 'params:' mapping of parameter name -> distribution")
    keys = valid_keys(cfg)
    params = {}
    for key_node, value_node in sections["params"].value:
        where = f"{path} line {key_node.start_mark.line + 1}"
        name = key_node.value
        _check_key(name, keys, where)
        spec = yaml.safe_load(yaml.serialize(value_node))
        params[name] = _param(name, spec, where, key_node.start_mark.line + 1)
    if not params:
        raise ReidRayError(f"{path}: 'params:' is empty; name at least one parameter to search")
    fixed = {}
    if "fixed" in sections:
        node = sections["fixed"]
        if not isinstance(node, yaml.MappingNode):
            raise ReidRayError(f"{path} line {node.start_mark.line + 1}: 'fixed:' must be a mapping of key: value")
        for key_node, value_node in node.value:
            _check_key(key_node.value, keys, f"{path} line {key_node.start_mark.line + 1}")
            fixed[key_node.value] = yaml.safe_load(yaml.serialize(value_node))
    # every value a trial could get must be accepted by the config (types, tuples, ...)
    probe = {**fixed, **{n: (p.values[0] if p.distribution == "choice" else p.low) for n, p in params.items()}}
    try:
        apply_overrides(copy.deepcopy(cfg), dict(probe))
    except ReidRayError as e:
        raise ReidRayError(f"{path}: {e}") from None
    return SearchSpace(str(path), params, fixed, text)


def _check_key(name: str, keys: list[str], where: str) -> None:
    if name not in keys:
        method_keys = [k for k in keys if k.startswith("params.")]
        raise ReidRayError(f"{where}: unknown parameter {name!r}; valid names: the method's "
                           f"{', '.join(method_keys) or '(none)'}, or any config key such as optim.lr, "
                           f"model.arch, loader.num_instances (`reid-ray train --set` lists them all)")


def _param(name: str, spec: Any, where: str, line: int) -> Param:
    if not isinstance(spec, dict) or "distribution" not in spec:
        raise ReidRayError(f"{where}: {name} needs {{distribution: ..., low: ..., high: ...}} "
                           f"(or values: [...] for choice); distributions: {', '.join(DISTRIBUTIONS)}")
    dist = spec["distribution"]
    if dist not in DISTRIBUTIONS:
        raise ReidRayError(f"{where}: {name}: unknown distribution {dist!r}; valid: {', '.join(DISTRIBUTIONS)}")
    extra = set(spec) - ({"distribution", "values"} if dist == "choice" else {"distribution", "low", "high"})
    if extra:
        raise ReidRayError(f"{where}: {name}: unexpected field(s) {sorted(extra)} for a {dist} distribution")
    if dist == "choice":
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            raise ReidRayError(f"{where}: {name}: choice needs a non-empty list, e.g. values: [a, b]")
        return Param(name, dist, values=values, line=line)
    low, high = spec.get("low"), spec.get("high")
    number = int if dist == "int" else (int, float)
    if not isinstance(low, number) or not isinstance(high, number) or isinstance(low, bool) or isinstance(high, bool):
        kind = "integers" if dist == "int" else "numbers"
        raise ReidRayError(f"{where}: {name}: low and high must be {kind} (write 1.0e-4, not 1e-4: YAML reads "
                           f"the latter as a string)")
    if low > high or (low == high and dist != "int"):
        raise ReidRayError(f"{where}: {name}: low ({low}) must be below high ({high})")
    if dist == "loguniform" and low <= 0:
        raise ReidRayError(f"{where}: {name}: loguniform needs low > 0")
    return Param(name, dist, low, high, line=line)
