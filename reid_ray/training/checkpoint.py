"""The checkpoint format, in one place: what a run's checkpoint.pt and best.pt hold, written atomically and read
with the safe loader.

A checkpoint is a dict: `method` (the method's own `state_dict`: its networks unwrapped, optimiser, scheduler and
whatever else it keeps; which of its entries are re-ID networks, and their names, only the method knows:
`Method.retrieval_networks`), `epoch`, `iteration`, `best`, `last_target`, `rng`, `config` (the run's `to_dict`),
`report` (the last metrics reported to Ray), and `run_key` and `data` (which MLflow run and which datasets it
belongs to). Ray Train keeps the latest ones as `checkpoint_<time>/checkpoint.pt` under the run folder; the best
by target mAP is also `best.pt` there. A cached source model (outputs/pretrain/baseline-*.pt) is the same dict.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from reid_ray import ReidRayError, atomic_path, full_disk_is_the_users

CHECKPOINT_FILE = "checkpoint.pt"  # what each reported checkpoint directory holds


def load_checkpoint(path: str | Path, flag: str = "--resume", mmap: bool = False) -> dict:
    """A reid-ray checkpoint, read with the safe loader (`torch.load(weights_only=True)`: tensors and plain
    types only, so a shared file cannot run code); a clear error for anything else."""
    import pickle

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise ReidRayError(f"{flag} {path}: refused by the safe checkpoint loader (it holds more than tensors and "
                           f"plain values: {str(e).splitlines()[0][:120]}); only checkpoints written by reid-ray load") from None
    except (RuntimeError, OSError, EOFError, ValueError, KeyError) as e:  # KeyError: the unpickler, on some text files
        raise ReidRayError(f"{flag} {path}: not a checkpoint torch can read ({type(e).__name__}); pass a "
                           "checkpoint.pt written by reid-ray train") from None
    if not isinstance(state, dict) or "method" not in state:
        raise ReidRayError(f"{flag} {path}: not a reid-ray checkpoint (expected a checkpoint.pt written by reid-ray train)")
    return state


def read_checkpoint(path: str | Path, flag: str = "--checkpoint") -> tuple[dict, dict]:
    """(the run config a checkpoint was written with, as `to_dict` wrote it: its `method` names the method; that
    method's own state, its `state_dict`): a checkpoint as a reader outside training takes it. The method state's
    layout is the method's to read (`Method.retrieval_networks`), never guessed here."""
    try:
        state = load_checkpoint(path, flag)
    except ReidRayError:
        raise
    except Exception as e:  # what load_checkpoint does not expect of a damaged file
        raise ReidRayError(f"{flag} {path}: not a checkpoint torch can read ({type(e).__name__}); pass a "
                           "checkpoint.pt written by reid-ray train") from None
    cfg = state.get("config")
    if not isinstance(cfg, dict) or not isinstance(cfg.get("method"), str):
        raise ReidRayError(f"{flag} {path}: a reid-ray checkpoint without its config (which method wrote it); pass one "
                           "written by reid-ray train (a checkpoint.pt, best.pt or outputs/pretrain/baseline-*.pt)")
    return cfg, state["method"]


def save_checkpoint(state: dict, path: str | Path) -> None:
    """`torch.save` through a temporary name beside `path` (reid_ray.atomic_path): a crash or a full disk
    mid-write leaves the previous file whole. A full disk is the user's error, naming the folder, its free
    space and the checkpoint's size."""
    with full_disk_is_the_users(path, state_nbytes(state)), atomic_path(path) as part:
        torch.save(state, part)


def state_nbytes(state: Any) -> int:
    """The bytes of the tensors in a (nested) state: about a checkpoint's size on disk."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_nbytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_nbytes(v) for v in state)
    return 0


def run_checkpoints(run_dir) -> list[tuple[str, float]]:
    """A run folder's Ray Train checkpoints (name, when its checkpoint file was written), oldest first (their
    names are their timestamps); a local folder or a URI alike."""
    from reid_ray import storage

    if not storage.is_dir(run_dir):
        return []
    return sorted((rel.split("/")[0], mtime) for rel, is_file, mtime in storage.listing(run_dir, recursive=True)
                  if is_file and rel.startswith("checkpoint_") and rel.count("/") == 1
                  and rel.endswith("/" + CHECKPOINT_FILE))


def newest_readable_checkpoint(run_dir, skip: tuple[str, ...] = ()) -> tuple[str | None, list[str]]:
    """(the newest checkpoint directory of `run_dir` whose checkpoint.pt loads, the newer ones that did not):
    a checkpoint cut short by a crash or a full disk is passed over, never loaded half."""
    from reid_ray import storage

    unreadable = []
    for name, _ in reversed(run_checkpoints(run_dir)):
        if name in skip:
            continue
        path = storage.join(run_dir, name, CHECKPOINT_FILE)
        try:
            load_checkpoint(storage.fetch(path) if storage.is_uri(path) else path, mmap=True)
        except ReidRayError:
            unreadable.append(name)
            continue
        return str(storage.join(run_dir, name)), unreadable
    return None, unreadable
