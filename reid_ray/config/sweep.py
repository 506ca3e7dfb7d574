"""A sweep's settings, typed, and where they live on disk (Ray-free; the sweep itself is distributed/sweep.py).

    sweep = Sweep(name="s-1", method=m, base=resolve_config(m, sweep=True), ...)
    sweep.save(sweep_dir("outputs", sweep.name))    # reid_ray_sweep.json: what `--resume` reads back
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from reid_ray import ReidRayError, storage, write_text_atomic
from reid_ray.config import TrainConfig, from_dict, to_dict

# what a sweep ranks trials on unless told otherwise (`Sweep.metric`): the latest target mAP, which every run
# reports each epoch (carried between evaluations)
METRIC = "target_mAP_last"
SWEEP_FILE = "reid_ray_sweep.json"


@dataclass
class Sweep:
    name: str
    method: str
    base: TrainConfig                  # every trial's config before its sample (config.resolve_config)
    space_path: str
    space_text: str
    num_samples: int
    seed: int = 0                      # seeds the TPE sampler
    scheduler: str = "asha"            # asha | none
    grace_period: int | None = None    # ASHA: epochs before a trial can stop (default: eval_every)
    reduction_factor: float = 2.0
    gpus_per_worker: float | None = None  # None: 1 when the cluster has GPUs, else 0 (decided once Ray runs)
    max_concurrent: int | None = None
    optuna_storage: str | None = None  # an Optuna storage URL (sqlite:///optuna.db): the study, for optuna-dashboard
    parent_run_id: str = ""            # the sweep's MLflow parent run (the sweep driver writes it)
    direct_transfer: dict = field(default_factory=dict)  # the source model's metrics
    adabn: dict = field(default_factory=dict)            # ... after AdaBN (driver.adabn_metrics): the bar to beat
    resumed: bool = False
    metric: str = METRIC               # the reported metric Optuna, ASHA and the best trial go by (higher is better)
    default_first: bool = True         # the first trial is the base config itself (where the space holds its values)

    def save(self, folder: Path | str) -> None:
        d = {**dataclasses.asdict(self), "base": to_dict(self.base)}
        if storage.is_uri(folder):  # a URI --output
            storage.write_text(storage.join(folder, SWEEP_FILE), json.dumps(d, indent=1, default=str))
            return
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(folder / SWEEP_FILE, json.dumps(d, indent=1, default=str))

    @classmethod
    def load(cls, folder: Path | str) -> Sweep:
        d = json.loads(storage.read_text(storage.join(folder, SWEEP_FILE)))
        return cls(**{**d, "base": from_dict(d["base"])})


def sweep_dir(output: str, name: str) -> Path | storage.Uri:
    """`<output>/tune/<name>`: an absolute Path, or a `storage.Uri` (which joins with `/` too) under a URI."""
    return storage.absolute(output) / "tune" / name


def latest_sweep(output: str, method: str) -> str:
    if storage.is_uri(output):  # the sweep whose reid_ray_sweep.json was written last
        root = storage.join(output, "tune")
        names = [name for name, is_file, _ in storage.listing(root) if not is_file and name.startswith(f"{method}-")]
        found = sorted((mtime, name) for name in names
                       for rel, is_file, mtime in storage.listing(storage.join(root, name)) if is_file and rel == SWEEP_FILE)
        if not found:
            raise ReidRayError(f"--resume: no earlier {method} sweep under {root}; pass --name of the sweep to resume")
        return found[-1][1]
    root = Path(output).expanduser().resolve() / "tune"
    found = sorted((p for p in root.glob(f"{method}-*") if (p / SWEEP_FILE).is_file()), key=os.path.getmtime)
    if not found:
        raise ReidRayError(f"--resume: no earlier {method} sweep under {root}; pass --name of the sweep to resume")
    return found[-1].name
