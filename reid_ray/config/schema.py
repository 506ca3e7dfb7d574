"""One typed config per run, built by one function from one precedence list.

    >>> cfg = resolve_config("baseline", sets=["model.arch=resnet18", "lr=1e-4"])  # dotted path or unique leaf
    >>> flatten(cfg)["optim.lr"]
    0.0001

`resolve_config` is the only place that layers a run's settings. Lowest first:

    1. defaults               the dataclasses below, and the method's own `Params` dataclass
    2. synthetic defaults     `SYNTHETIC_DEFAULTS` when both domains are the embedded benchmark
    3. the method's config    `Method.config_defaults` (what its paper trains with everywhere); on the
                              embedded benchmark also `Method.synthetic_overrides`;
                              with `--source none`, `Method.unsupervised` (the fully unsupervised
                              setting: no source model to start from), on the embedded benchmark also
                              `Method.synthetic_unsupervised`; in a sweep on the embedded benchmark,
                              last, `SYNTHETIC_SWEEP` (short trials), then `Method.sweep_overrides`
    4. preset                 `--preset`: the shared real-benchmark settings, then the method's own
                              (`Method.presets`, see presets.py)
    5. config file            `--config` (a run's config.yaml, a sweep's best_config.yaml), or a search
                              space's `fixed:` section
    6. flags                  `--epochs`, `--workers`, `--init`, ...
    7. `--set key=value`
    8. a Tune sample          applied to the resolved base by each trial (distributed/sweep.py)

`train`, `tune`, the benchmarks and the tests all call it. Names are the papers' names, documented
once where they are defined: here for shared fields, in `methods/<name>.py` for a method's `params`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import numbers
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from reid_ray import ReidRayError
from reid_ray.data.domains import NO_SOURCE  # noqa: F401 - --source none: the fully unsupervised setting
from reid_ray.data.folder import folder_label, is_folder
from reid_ray.data.loader import LoaderConfig
from reid_ray.data.transforms import TransformConfig
from reid_ray.methods.base import NoParams
from reid_ray.models.reid_net import ModelConfig
from reid_ray.models.sync_bn import check_samples_per_bn


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
    base_lr_mult: float = 1.0          # lr multiplier of the backbone (the ImageNet layers); 0.1: a tenth of the new layers'
    bn_weight_decay: bool = True       # False: no weight decay on BatchNorm weights and biases
    fused: str = "auto"                # the optimiser's fused kernel (one launch for every parameter): auto: on CUDA
    #                                    (its `found_inf` also lets a NaN step be skipped without a host sync);
    #                                    elsewhere torch's default path | true | false


@dataclass
class ClusteringConfig:
    """Where and with what a method's pseudo-labels are computed (clustering/client.py). A config that says
    `clustering: local` (one written before the backend existed, or `--clustering local`) sets `where`."""

    SHORTHAND: ClassVar[str] = "where"
    where: str = "actor"               # actor (the PseudoLabeler Ray actor) | local (rank 0, in-process)
    backend: str = "auto"              # auto (faiss's GPU build, else torch on a CUDA GPU, else faiss-cpu) | faiss |
                                       # torch (on CUDA, else the CPU): clustering/kmeans.py's clustering_engine
    pictures: bool = True              # each refresh's target features in 2-D by pseudo-label, logged to MLflow


@dataclass
class LabelFreeConfig:
    """The label-free scores each evaluation computes (evaluation/label_free.py), on fixed seeded subsets so that
    every trial of a sweep is scored on the same images: what `metric` can rank on when the target has no labels."""

    enabled: bool = True
    source_val_ids: int = 100          # source-validation mAP: this many of the source's held-out identities (its
                                       # query/gallery, never in its training split), drawn with `seed`
    probe_images: int = 512            # target-only mixup probe: its pool of target training images
    probe_pairs: int = 256             # ... and its mixed probes
    probe_lam: float = 0.7             # ... each m = lam·x_a + (1 − lam)·x_b
    seed: int = 0                      # fixed across trials and seeds (not the run's seed)


# what `metric` may name: the scores a run can rank its epochs (best.pt) and a sweep its trials on
METRICS = ("target_mAP", "source_val_mAP", "target_probe", "target_sharpness")
# what `metric: auto` ranks on where the target has no labels, and the label-free score shown beside target mAP
# where it has them: chosen on the default benchmark's seed 0 (bench/RESULTS.md, "Choosing without target labels")
LABEL_FREE_DEFAULT = "target_sharpness"


@dataclass
class TrainConfig:
    method: str = "baseline"
    source: str = "synth-a"            # a dataset, or "none": the fully unsupervised setting (target only)
    target: str = "synth-b"
    data_root: str = "data"
    epochs: int = 120
    eval_every: int = 10
    eval_source: bool = True           # source test set at every evaluation; False: at the last epoch only (sweeps)
    metric: str = "auto"               # what best.pt and a sweep rank on (METRICS): auto = target_mAP when the target
                                       # has labels, else LABEL_FREE_DEFAULT (target_sharpness)
    label_free: LabelFreeConfig = field(default_factory=LabelFreeConfig)
    seed: int = 0
    workers: int = 2
    use_gpu: str = "auto"              # auto | true | false
    gpu_wait_s: float = 900            # use_gpu=true on an autoscaling cluster: wait this long for GPU nodes
    amp: bool = True                   # mixed precision (GPU only): bf16 where supported, else fp16 + GradScaler
    checkpoint_upload: str = "auto"    # sync | async (Ray Train uploads while the next epoch runs) | auto:
                                       # async on GPUs, sync on CPU
    checkpoint_every: int = 1          # epochs between checkpoints (the last epoch always has one); a restart
                                       # after a lost worker repeats up to this many epochs, exactly
    max_failures: int = 2              # worker failures tolerated (resume from the last checkpoint)
    log_model: bool = True             # the best network as an MLflow model at the end (reid_ray.inference embedder)
    max_nonfinite_steps: int = 10      # NaN/inf losses in a row (each step skipped) before the run stops "diverged"
    output: str = "outputs"
    resume: str = ""
    init: list[str] = field(default_factory=list)  # source-trained baseline checkpoints a UDA method starts
                                                   # from, one per source model it needs (`--init A B`)
    pretrain_epochs: int = 0           # epochs of that source training when no --init (0: the baseline's)
    clustering: ClusteringConfig = field(default_factory=ClusteringConfig)
    mlflow_uri: str = ""
    experiment: str = ""               # MLflow experiment; default "<source>-><target>"
    name: str = ""                     # run name; default "<method>-<time>"
    model: ModelConfig = field(default_factory=ModelConfig)
    transform: TransformConfig = field(default_factory=TransformConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    params: Any = field(default_factory=NoParams)  # the method's own `Params` dataclass (see its file)

    @property
    def experiment_name(self) -> str:
        """The MLflow experiment the run lands in: `experiment`, else "<source>-><target>" (an image folder by its
        own name: `synth-a->folder:crops`)."""
        return self.experiment or self.source_to_target

    @property
    def source_to_target(self) -> str:
        return f"{self.source}->{self.target_label}"

    @property
    def target_label(self) -> str:
        """The target as tables and titles name it: a dataset's name, or `folder:<its name>`."""
        return folder_label(self.target) if is_folder(self.target) else self.target

    @property
    def target_labelled(self) -> bool:
        """False when the target is a user's image folder: no identities, so no target mAP."""
        return not is_folder(self.target)

    @property
    def selection_metric(self) -> str:
        """The metric `metric` names, `auto` resolved: target mAP where the target has labels, else
        LABEL_FREE_DEFAULT, the target-only neighbourhood sharpness: of the label-free scores, the one that followed
        target mAP across a sweep's trials and over a run's epochs on the default benchmark's seed 0 (the source-
        validation mAP falls as a run adapts; bench/RESULTS.md, "Choosing without target labels")."""
        if self.metric != "auto":
            return self.metric
        return "target_mAP" if self.target_labelled else LABEL_FREE_DEFAULT

    @property
    def label_free_metric(self) -> str | None:
        """The label-free score shown beside target mAP (the one `metric: auto` ranks on without labels)."""
        return LABEL_FREE_DEFAULT if self.label_free.enabled else None

    @property
    def scores(self) -> tuple[str, ...]:
        """The rankable metrics (METRICS) this run computes at each evaluation: target mAP where the target has
        labels; the label-free scores unless `label_free.enabled` is false (source_val_mAP needs a source)."""
        lf = self.label_free.enabled
        return tuple(m for m, ok in (("target_mAP", self.target_labelled), ("source_val_mAP", lf and self.has_source),
                                     ("target_probe", lf), ("target_sharpness", lf)) if ok)

    @property
    def has_source(self) -> bool:
        """False in the fully unsupervised setting (`--source none`): no labelled source is read at all."""
        return self.source != NO_SOURCE


# Layer 2: the embedded default: small images, a small backbone and a schedule that fits minutes on 2 CPU cores.
SYNTHETIC_DEFAULTS = {
    "epochs": 20, "eval_every": 5,
    "model.arch": "small",
    "transform.height": 64, "transform.width": 32, "transform.pad": 4,
    "loader.in_memory": True,
    "optim.warmup_epochs": 3, "optim.milestones": (12, 17),
}
# ... and for a sweep on it, which must finish in minutes on 2 CPU cores: a shorter source pretraining,
# short trials evaluated every epoch (ASHA's rungs), one worker per trial (no DDP overhead on 2 cores)
SYNTHETIC_SWEEP = {"epochs": 3, "eval_every": 1, "pretrain_epochs": 8, "workers": 1}


def is_synthetic(source: str, target: str) -> bool:
    """The embedded benchmark's settings apply: both domains are the embedded benchmark, or its target with no
    source (the only test of it), or an image folder adapted to from the embedded source (its source models are
    the embedded benchmark's small network at 64×32)."""
    from reid_ray.data.synthetic import DOMAINS

    if is_folder(target):
        return source.lower() in DOMAINS
    return (source.lower() in DOMAINS or source.lower() == NO_SOURCE) and target.lower() in DOMAINS


def _domain_name(name: str) -> str:
    """A dataset name lower-cased; an image folder `folder:PATH` with PATH made absolute (its case kept)."""
    from reid_ray.data.folder import folder_spec

    return folder_spec(name) if is_folder(name) else name.lower()


def no_source_overrides(cls) -> dict:
    """What `--source none` sets for method class `cls` (its `unsupervised` overrides: no source model to start
    from), or one clear error when the method needs a labelled source."""
    from reid_ray.methods import METHODS

    if cls.unsupervised is None:
        able = ", ".join(sorted(m for m, c in METHODS.items() if c.unsupervised is not None))
        raise ReidRayError(f"{cls.name} needs a labelled source, and --source none has none; the fully unsupervised "
                           f"setting runs {able} (or name a source dataset)")
    return cls.unsupervised


def resolve_config(method: str = "baseline", source: str | None = None, target: str | None = None, *,
                   preset: str | None = None, file: dict | None = None, flags: dict | None = None,
                   sets: list[str] | dict | None = None, sweep: bool = False) -> TrainConfig:
    """The run's config from the layers of the module docstring (None flags are not given).

    `source`/`target` given explicitly win over the preset's; without either, synth-a -> synth-b.
    `file` holds dotted keys (see `load_config_file`); `flags` field names; `sets` `key=value` strings
    or a {key: value} mapping."""
    from reid_ray.config.presets import apply_preset
    from reid_ray.data.readers import dataset_names
    from reid_ray.methods import method_class

    cls = method_class(method)
    preset_overrides: dict = {}
    if preset:
        p_source, p_target, preset_overrides = apply_preset(preset, cls)
        source, target = source or p_source, target or p_target
    source, target = _domain_name(source or "synth-a"), _domain_name(target or "synth-b")
    if is_folder(source):
        raise ReidRayError(f"--source {source}: an image folder has no identity labels, so it can only be the target "
                           "(--target folder:PATH); name a labelled source dataset, or --source none")
    for d in (source, target):
        if d not in dataset_names() and not (d == NO_SOURCE and d == source) and not is_folder(d):
            raise ReidRayError(f"unknown dataset {d!r}; valid names: {', '.join(dataset_names())}"
                               + (f" (and --source {NO_SOURCE}: no source)" if d == source else
                                  " (or folder:PATH, your own unlabelled images)"))
    cfg = TrainConfig(method=cls.name, source=source, target=target, params=cls.Params())
    synthetic = is_synthetic(source, target)
    if synthetic:                                                         # 2
        apply_overrides(cfg, SYNTHETIC_DEFAULTS)
    apply_overrides(cfg, cls.config_defaults)                             # 3
    if synthetic:
        apply_overrides(cfg, cls.synthetic_overrides)
    if source == NO_SOURCE:
        apply_overrides(cfg, no_source_overrides(cls))
        if synthetic:
            apply_overrides(cfg, cls.synthetic_unsupervised)
    if synthetic and sweep:
        apply_overrides(cfg, {**SYNTHETIC_SWEEP, **cls.sweep_overrides})
    apply_overrides(cfg, preset_overrides)                                # 4
    apply_overrides(cfg, file or {})                                      # 5
    apply_overrides(cfg, {k: v for k, v in (flags or {}).items() if v is not None})  # 6
    apply_overrides(cfg, sets or [])                                      # 7
    check_choices(cfg, cls.choices)
    check_metric(cfg)
    check_samples_per_bn(cfg.model.samples_per_bn, cfg.loader.num_identities * cfg.loader.num_instances, cfg.workers)
    return cfg


_CHOICES = {"clustering.where": ("actor", "local"), "clustering.backend": ("auto", "faiss", "torch"),
            "use_gpu": ("auto", "true", "false", "1", "0", "yes", "no"),
            "checkpoint_upload": ("auto", "sync", "async"), "loader.decode": ("cpu", "device"),
            "optim.optimizer": ("adam", "sgd"),
            "optim.fused": ("auto", "true", "false"), "model.pooling": ("avg", "gem")}


def check_metric(cfg: TrainConfig) -> None:
    """A `metric` the run can compute: target mAP needs target labels, source_val_mAP a source, and the label-free
    scores `label_free.enabled`."""
    if cfg.metric not in ("auto", *METRICS):
        raise ReidRayError(f"metric={cfg.metric!r}; valid: auto, {', '.join(METRICS)}")
    lf = cfg.label_free
    if not (0.5 < lf.probe_lam < 1 and lf.source_val_ids >= 1 and lf.probe_images >= 3 and lf.probe_pairs >= 1):
        raise ReidRayError(f"label_free needs 0.5 < probe_lam < 1 (the first image dominates each mix), source_val_ids "
                           f"≥ 1, probe_images ≥ 3 and probe_pairs ≥ 1; got probe_lam={lf.probe_lam}, source_val_ids="
                           f"{lf.source_val_ids}, probe_images={lf.probe_images}, probe_pairs={lf.probe_pairs}")
    m = cfg.selection_metric
    if m == "target_mAP" and not cfg.target_labelled:
        raise ReidRayError(f"--metric target_mAP needs target labels, and {cfg.target_label} has none; rank on "
                           "target_sharpness, target_probe or source_val_mAP (or leave --metric out)")
    if m == "source_val_mAP" and not cfg.has_source:
        raise ReidRayError("--metric source_val_mAP needs a labelled source, and --source none has none; rank on "
                           "target_sharpness or target_probe")
    if m != "target_mAP" and not cfg.label_free.enabled:
        raise ReidRayError(f"--metric {m} is a label-free score, and label_free.enabled=false turns them off; "
                           "drop that --set")


def check_choices(cfg: TrainConfig, method_choices: dict | None = None) -> None:
    """Fields that take one of a few words (the shared ones, and `Method.choices`): a one-line error naming
    the valid ones."""
    flat = flatten(cfg)
    for key, valid in {**_CHOICES, **(method_choices or {})}.items():
        if str(flat[key]).lower() not in valid:
            raise ReidRayError(f"{key}={flat[key]!r}; valid: {', '.join(v for v in valid if v not in ('1', '0', 'yes', 'no'))}")


def load_config_file(path: str | Path) -> tuple[str | None, str | None, str | None, dict]:
    """A config YAML (a sweep's best_config.yaml, a run's config.yaml, or a hand-written subset):
    (method, source, target, dotted overrides). Run-specific fields (name, resume) are dropped."""
    import yaml

    from reid_ray import storage

    storage.check_file(str(path), "--config")
    if not storage.is_file(path):  # a local file, or one under a URI (a sweep's best_config.yaml on s3://)
        raise ReidRayError(f"--config {path}: no such file")
    p = storage.fetch(path)
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ReidRayError(f"--config {path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ReidRayError(f"--config {path}: expected a mapping of config keys (e.g. epochs: 40, optim: {{lr: 3.5e-4}})")

    flat = dotted(data)
    method, source, target = (flat.pop(k, None) for k in ("method", "source", "target"))
    for k in ("name", "resume"):
        flat.pop(k, None)
    return method, source, target, flat


# --------------------------------------------------------------------------- typed overrides

def dotted(d: dict, prefix: str = "") -> dict:
    """A nested mapping (YAML, `to_dict`) as dotted keys: {"optim": {"lr": 1}} -> {"optim.lr": 1}."""
    out = {}
    for k, v in d.items():
        out.update(dotted(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


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
        else:
            out[key] = value
    return out


def valid_keys(cfg) -> list[str]:
    return sorted(flatten(cfg))


def _type_name(typ: Any) -> str:
    return getattr(typ, "__name__", None) if typing.get_origin(typ) is None else str(typ)


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """`value` as the field's type: strings are parsed, other values checked (ints widen to float)."""
    origin = typing.get_origin(typ)
    bad = ReidRayError(f"{key}={value!r}: expected {_type_name(typ)}")
    if origin in (tuple, list):
        inner = typing.get_args(typ)[0]
        items = [v for v in value.strip("()[] ").split(",") if v.strip()] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise bad
        seq = [_coerce(v.strip() if isinstance(v, str) else v, inner, key) for v in items]
        return tuple(seq) if origin is tuple else seq
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise bad
    if typ in (int, float):
        if isinstance(value, str):
            try:
                return typ(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or (
                typ is int and not (math.isfinite(value) and value == int(value))):
            raise bad  # ints widen to float; a float is an int only when it is whole (YAML's 4.0)
        return typ(value)
    if typ is str:
        if isinstance(value, bool):  # YAML's `use_gpu: true`
            return str(value).lower()
        if isinstance(value, (str, numbers.Real)):
            return str(value)
        raise bad
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            raise bad from None
    return value


def _resolve(cfg, key: str) -> str:
    keys = valid_keys(cfg)
    if key in keys:
        return key
    if key.startswith("params."):
        names = [k for k in keys if k.startswith("params.")]
        raise ReidRayError(f"unknown parameter {key!r} of method {cfg.method!r}; valid names: "
                           f"{', '.join(names) or '(it has none)'}")
    matches = [k for k in keys if k.rsplit(".", 1)[-1] == key]
    if len(matches) == 1:
        return matches[0]
    hint = f"ambiguous: {', '.join(matches)}" if matches else f"valid keys: {', '.join(keys)}"
    raise ReidRayError(f"unknown config key {key!r} ({hint})")


def _shorthand(cfg, key: str) -> str:
    """A key naming a section whose dataclass has a `SHORTHAND` field means that field (`clustering` ->
    `clustering.where`), so a plain value given for the section keeps its meaning from before it had more."""
    obj = cfg
    for part in key.split("."):
        if not dataclasses.is_dataclass(obj) or part not in _fields(obj):
            return key
        obj = getattr(obj, part)
    short = getattr(type(obj), "SHORTHAND", None) if dataclasses.is_dataclass(obj) else None
    return f"{key}.{short}" if short else key


def set_value(cfg, key: str, value: Any) -> None:
    """Set a dotted key (or unique leaf name) in place, converting to and checking the field's type."""
    path = _resolve(cfg, _shorthand(cfg, key)).split(".")
    obj = cfg
    for part in path[:-1]:
        obj = getattr(obj, part)
    hints = typing.get_type_hints(type(obj))
    setattr(obj, path[-1], _coerce(value, hints[path[-1]], ".".join(path)))


def apply_overrides(cfg, items: list[str] | dict[str, Any]):
    """Apply `key=value` strings (CLI `--set`) or a {key: value} mapping (a layer, a Tune sample)."""
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
    """The inverse of `to_dict`, with every key and type checked (a config dict from a file or a checkpoint)."""
    from reid_ray.methods import method_class

    d = copy.deepcopy(d)
    cfg = TrainConfig(method=d.get("method", "baseline"), params=method_class(d.get("method", "baseline")).Params())
    flat = dotted(d)
    flat.pop("method", None)
    return apply_overrides(cfg, flat)
