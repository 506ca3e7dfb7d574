"""The two domains of a run: read once per process, the synthetic benchmark written first if asked for.

    domains = ensure_data(cfg)        # driver: checks real datasets, writes synth-a/synth-b if missing
    domains = load_domains("synth-a", "synth-b", "/abs/data")   # anywhere after: cached per process

A run with `--source none` (the fully unsupervised setting) has `domains.source = None`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from reid_ray.data.readers import ReIDDataset, read_dataset
from reid_ray.data.synthetic import DOMAINS as SYNTH_DOMAINS
from reid_ray.data.synthetic import SynthConfig, generate_synthetic

NO_SOURCE = "none"  # --source none: the fully unsupervised setting, the target alone (no source dataset)


@dataclass
class Domains:
    source: ReIDDataset | None  # None: no source (--source none)
    target: ReIDDataset

    def named(self) -> list[tuple[str, ReIDDataset]]:
        """[(role, dataset)] of the domains the run has: ("source", ...) unless it has none, then ("target", ...)."""
        return [(role, ds) for role, ds in (("source", self.source), ("target", self.target)) if ds is not None]


_LOADED: dict[tuple[str, str], ReIDDataset] = {}


def _load(name: str, root: Path) -> ReIDDataset:
    """One dataset under `root`, read (from its Parquet manifest) once per process."""
    key = (name, str(root))
    if key not in _LOADED:
        _LOADED[key] = read_dataset(name, root)
    return _LOADED[key]


def load_domains(source: str, target: str, root: str | Path) -> Domains:
    """Both domains under `root`, each read once per process."""
    root = Path(root).expanduser().resolve()
    return Domains(None if source == NO_SOURCE else _load(source, root), _load(target, root))


def ensure_data(cfg) -> Domains:
    """Check the real datasets of `cfg`, then write the synthetic domains it names if missing, then read
    both. A missing real dataset fails before anything is written. Sets `cfg.data_root` absolute."""
    root = Path(cfg.data_root).expanduser().resolve()
    for name in {cfg.source, cfg.target} - set(SYNTH_DOMAINS) - {NO_SOURCE}:
        _load(name, root)  # a clear DatasetError (missing folder, layout) before any synthetic write
    missing = tuple(d for d in SYNTH_DOMAINS if d in (cfg.source, cfg.target) and not (root / d).exists())
    if missing:
        print(f"writing the synthetic benchmark ({', '.join(missing)}) to {root} ...", flush=True)
        generate_synthetic(root, SynthConfig(domains=missing), progress=True)
    cfg.data_root = str(root)
    return load_domains(cfg.source, cfg.target, root)
