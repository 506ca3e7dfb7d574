"""File-name parsers and folder layouts of the published re-ID datasets.

Each layout knows the dataset's own top folder and how its files map to
(path, pid, camid). The scanning itself, validation and caching live in
`readers.py`; this module only describes the published formats.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

# Market-1501 / DukeMTMC-reID / CUHK03-NP / synthetic: "0002_c1s1_000451_03.jpg",
# "0001_c2_f0046182.jpg", "0001_c1_1.png". pid may be -1 (junk) or 0 (distractor).
MARKET_NAME = re.compile(r"^(-?\d+)_c(\d+)")


def parse_market_name(name: str) -> tuple[int, int] | None:
    """(pid, 0-based camid) of a Market-style file name, or None if it is not one."""
    m = MARKET_NAME.match(name)
    if m is None:
        return None
    return int(m.group(1)), int(m.group(2)) - 1


def parse_msmt_name(relpath: str) -> int:
    """0-based camid of an MSMT17 list entry: the third '_' field of the file name.

    "0000/0000_000_01_0303morning_0015_0.jpg" -> camera 1 -> camid 0.
    """
    return int(Path(relpath).name.split("_")[2]) - 1


@dataclass(frozen=True)
class FolderLayout:
    """A dataset stored as three folders of Market-style file names."""

    top: str  # the dataset's own top folder, relative to the root passed by the user
    train: str = "bounding_box_train"
    query: str = "query"
    gallery: str = "bounding_box_test"
    num_cameras: int | None = None  # as published, for the sanity check in stats


@dataclass(frozen=True)
class ListLayout:
    """MSMT17: image folders plus `list_*.txt` files of `relpath pid` lines."""

    top: str
    train_dir: str
    test_dir: str
    train_lists: tuple[str, ...] = ("list_train.txt", "list_val.txt")
    query_list: str = "list_query.txt"
    gallery_list: str = "list_gallery.txt"
    num_cameras: int | None = 15
    all_in_train: bool = False  # msmt17-all: query and gallery join the training split, their pids shifted
                                # past the training ones (MSMT17 numbers its test ids from 0 again)


Layout = FolderLayout | ListLayout

# Alternatives are tried in order; the first whose top folder exists is read.
LAYOUTS: dict[str, tuple[Layout, ...]] = {
    "market1501": (
        FolderLayout("Market-1501-v15.09.15", num_cameras=6),
        FolderLayout("Market-1501", num_cameras=6),
    ),
    "dukemtmc": (FolderLayout("DukeMTMC-reID", num_cameras=8),),
    "msmt17": (
        ListLayout("MSMT17_V1", train_dir="train", test_dir="test"),
        ListLayout("MSMT17_V2", train_dir="mask_train_v2", test_dir="mask_test_v2"),
    ),
    # all four MSMT17 lists as one training split of 4,101 identities (MAR's reference agents); its
    # query/gallery are MSMT17's, seen in training: a source dataset only, not for evaluation
    "msmt17-all": (
        ListLayout("MSMT17_V1", train_dir="train", test_dir="test", all_in_train=True),
        ListLayout("MSMT17_V2", train_dir="mask_train_v2", test_dir="mask_test_v2", all_in_train=True),
    ),
    # CUHK03-NP (Zhong et al.'s new protocol); "labeled" boxes by default.
    "cuhk03np": (FolderLayout("cuhk03-np/labeled", num_cameras=2),),
    "cuhk03np-detected": (FolderLayout("cuhk03-np/detected", num_cameras=2),),
    # The embedded synthetic benchmark, written in the Market-1501 layout.
    "synth-a": (FolderLayout("synth-a", num_cameras=5),),
    "synth-b": (FolderLayout("synth-b", num_cameras=5),),
}
