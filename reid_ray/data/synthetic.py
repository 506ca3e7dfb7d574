"""The embedded synthetic two-domain re-ID benchmark (`synth-a` -> `synth-b`).

    $ reid-ray synth data/            # writes data/synth-a and data/synth-b
    >>> generate_synthetic("data/")   # same, from Python; same seed, same bytes

Each domain is written in the Market-1501 layout (`bounding_box_train/`,
`query/`, `bounding_box_test/`, names `0002_c1s1_000451_03.jpg`) so the
Market reader reads it, plus:
  - `camstyle/<name>_fake_<c>to<c'>.jpg`: every training image re-rendered under
    every other camera of its domain (ECN's CamStyle naming): the same person in
    the same pose, seen through the other camera;
  - `texture/<pid>.png`: the identity's aligned full-body texture map (front
    view left, back view right, one body template for all: SAN's target);
  - `synth_meta.json`: the generator version and config.

Design (measured in the benchmark's design runs, bench/RESULTS.md "The synthetic benchmark"): identity cues (clothing
colours, patterns, body proportions, accessories) are drawn from the SAME
distribution in both domains; the domain gap lives in what a camera changes
(background, illumination, colour cast, contrast, blur, noise, scale), with
disjoint ranges: synth-a is light, near-grey, sharp; synth-b is darker,
blurred, noisy, smaller and bluish on every camera. Backgrounds are redrawn per image so
that no fixed texture fingerprints a camera.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from reid_ray import ReidRayError
from reid_ray.data.synth_render import STYLES, compose, render_texture, sample_camera, sample_identity

GENERATOR_VERSION = 2
DOMAINS = ("synth-a", "synth-b")


@dataclass(frozen=True)
class SynthConfig:
    """Sizes of each synthetic domain. The defaults fit a few-minute CPU demo."""

    seed: int = 0
    train_ids: int = 150
    test_ids: int = 100
    images_per_id: tuple[int, int] = (8, 12)   # inclusive range
    cameras_per_id: tuple[int, int] = (2, 5)   # inclusive range, of num_cameras
    num_cameras: int = 5
    camstyle: bool = True
    texture: bool = True
    jpeg_quality: int = 92
    domains: tuple[str, ...] = field(default=DOMAINS)

    def __post_init__(self):
        if self.cameras_per_id[0] < 2:
            raise ReidRayError("cameras_per_id must start at 2: a query needs a match in another camera")
        if self.images_per_id[0] < 2 * self.cameras_per_id[0]:
            raise ReidRayError("images_per_id must be at least 2 per camera (one query + one gallery)")
        if self.cameras_per_id[1] > self.num_cameras:
            raise ReidRayError("cameras_per_id cannot exceed num_cameras")
        unknown = set(self.domains) - set(DOMAINS)
        if unknown:
            raise ReidRayError(f"unknown synthetic domains {sorted(unknown)}; valid: {', '.join(DOMAINS)}")


def _rng(cfg: SynthConfig, domain: str, *key: int) -> np.random.Generator:
    # Every random draw is keyed by what it renders, so any image can be re-rendered alone.
    return np.random.default_rng(np.random.SeedSequence([cfg.seed, DOMAINS.index(domain), *key]))


# --------------------------------------------------------------------------- writer

def _plan_identity(rng, cfg: SynthConfig) -> list[int]:
    """Camera (0-based) of each image of one identity: >= 2 images in every camera it visits."""
    n_img = int(rng.integers(cfg.images_per_id[0], cfg.images_per_id[1] + 1))
    n_cam = min(int(rng.integers(cfg.cameras_per_id[0], cfg.cameras_per_id[1] + 1)), n_img // 2)
    cams = sorted(rng.choice(cfg.num_cameras, size=n_cam, replace=False).tolist())
    plan = cams * 2 + rng.choice(cams, size=n_img - 2 * n_cam).tolist()
    return sorted(plan)


def _view(rng) -> tuple[str, float, bool, tuple[float, float, float]]:
    view = ("front", "back", "side")[rng.choice(3, p=[0.4, 0.35, 0.25])]
    return view, float(rng.uniform(-2.5, 2.5)), bool(rng.random() < 0.5), (
        float(rng.uniform(0.95, 1.05)), float(rng.uniform(-3, 3)), float(rng.uniform(-3, 3)))


def _domain_plan(domain: str, cfg: SynthConfig) -> list[tuple[int, list[tuple[int, int, str, str]]]]:
    """(pid, [(k, camera, name, folder), ...]) of every identity of one domain. Cheap (no pixels): the file
    names number each camera's frames across identities, so the names are planned in order and the pixels
    rendered in any order (`_render_identities`), as every draw is keyed by what it renders."""
    frame = [0] * cfg.num_cameras
    plan = []
    for pid in range(1, cfg.train_ids + cfg.test_ids + 1):
        seen_query: set[int] = set()
        images = []
        for k, c in enumerate(_plan_identity(_rng(cfg, domain, 2, pid), cfg)):
            frame[c] += 25
            if pid <= cfg.train_ids:
                folder = "bounding_box_train"
            else:
                folder = "bounding_box_test" if c in seen_query else "query"
                seen_query.add(c)
            images.append((k, c, f"{pid:04d}_c{c + 1}s1_{frame[c]:06d}_{k:02d}", folder))
        plan.append((pid, images))
    return plan


def _render_identities(args) -> int:
    """Render identities of one domain into `top` (a process-pool task); returns how many."""
    top, domain, cfg, identities = args
    top, style = Path(top), STYLES[domain]
    cams = [sample_camera(_rng(cfg, domain, 0, c), style) for c in range(cfg.num_cameras)]
    for pid, images in identities:
        person = sample_identity(_rng(cfg, domain, 1, pid))
        for k, c, name, folder in images:
            pose = _view(_rng(cfg, domain, 3, pid, k))
            img = compose(person, cams[c], style, *pose, rng=_rng(cfg, domain, 4, pid, k))
            img.save(top / folder / f"{name}.jpg", quality=cfg.jpeg_quality)
            if folder == "bounding_box_train" and cfg.camstyle:
                for c2 in range(cfg.num_cameras):
                    if c2 != c:  # the same person and pose, through camera c2
                        fake = compose(person, cams[c2], style, *pose, rng=_rng(cfg, domain, 5, pid, k, c2))
                        fake.save(top / "camstyle" / f"{name}_fake_{c + 1}to{c2 + 1}.jpg", quality=cfg.jpeg_quality)
        if cfg.texture:
            render_texture(person).save(top / "texture" / f"{pid:04d}.png")
    return len(identities)


def _meta(domain: str, cfg: SynthConfig) -> dict:
    config = asdict(cfg)
    del config["domains"]  # which domains were asked for does not change a domain's bytes
    return json.loads(json.dumps({"generator_version": GENERATOR_VERSION, "domain": domain, "config": config}))


def _meta_matches(top: Path, domain: str, cfg: SynthConfig) -> bool:
    try:
        meta = json.loads((top / "synth_meta.json").read_text())
    except (OSError, ValueError):
        return False
    return meta == _meta(domain, cfg)


def generate_synthetic(out_dir: str | os.PathLike, config: SynthConfig = SynthConfig(), *,
                       overwrite: bool = False, progress: bool = False) -> list[Path]:
    """Write every domain of `config` under `out_dir`; returns the domain folders.

    A domain that already exists with the same config and generator version is
    kept as is. Each domain is written to a temporary folder and renamed into
    place, so an interrupted run never leaves a half-written dataset. The
    identities are rendered by a process pool, one process per CPU: the same
    bytes as one process writes (every draw is keyed by what it renders).
    """
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    todo = []
    for domain in config.domains:
        top = out / domain
        if top.exists():
            if _meta_matches(top, domain, config):
                continue
            if not overwrite:
                raise ReidRayError(f"{top} exists but was generated with another config or version; "
                                   f"delete it, pass --overwrite, or choose another folder")
        todo.append(domain)
    if not todo:
        return [out / d for d in config.domains]
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from reid_ray.tracking.progress import bar

    total = len(todo) * (config.train_ids + config.test_ids)
    tmps = {d: Path(tempfile.mkdtemp(prefix=f".{d}.", dir=out)) for d in todo}
    try:
        parts = []
        for domain in todo:
            top = tmps[domain] / domain
            for f in ("bounding_box_train", "query", "bounding_box_test", "camstyle", "texture"):
                (top / f).mkdir(parents=True)
            plan = _domain_plan(domain, config)
            parts += [(str(top), domain, config, plan[i::16]) for i in range(min(16, len(plan)))]
        workers = min(len(os.sched_getaffinity(0)), len(parts))
        # forked workers (one per CPU): they render with numpy and PIL only (no torch), and start in milliseconds
        with (bar(total, "synthesising", "ids") if progress else contextlib.nullcontext()) as shown, \
                (ProcessPoolExecutor(workers, mp_context=get_context("fork")) if workers > 1
                 else contextlib.nullcontext()) as pool:
            for n in (pool.map if pool is not None else map)(_render_identities, parts):
                if shown is not None:
                    shown.update(n)
        for domain in todo:
            (tmps[domain] / domain / "synth_meta.json").write_text(json.dumps(_meta(domain, config), indent=2,
                                                                               sort_keys=True))
            if (out / domain).exists():
                shutil.rmtree(out / domain)
            os.replace(tmps[domain] / domain, out / domain)
    finally:
        for tmp in tmps.values():
            shutil.rmtree(tmp, ignore_errors=True)
    return [out / d for d in config.domains]


# --------------------------------------------------------------------------- Market-shaped, for throughput

# Market-1501's published counts (Zheng et al., ICCV 2015): its training set and test split, distractors aside
MARKET_SHAPE = {"train_ids": 751, "train_images": 12_936, "test_ids": 750, "query": 3_368, "gallery": 15_913,
                "cameras": 6, "size": (256, 128)}
MARKET_TOP = "Market-1501-v15.09.15"


def _spread(total: int, n: int, rng) -> np.ndarray:
    """n counts that sum to `total`, as equal as possible, the larger ones on random members."""
    counts = np.full(n, total // n)
    counts[rng.permutation(n)[:total % n]] += 1
    return counts


def market_plan(seed: int = 0) -> list[tuple[int, str, list[int]]]:
    """(pid, split, cameras of its images) for every identity: exactly Market's ids, images, queries and
    gallery images. Training ids visit 2-6 cameras; a test id has one query per camera it visits (4 or 5,
    as Market's 3,368 queries of 750 ids) and its gallery images spread over the same cameras."""
    m = MARKET_SHAPE
    rng = np.random.default_rng([seed, 77])
    plan = []
    for pid, n in enumerate(_spread(m["train_images"], m["train_ids"], rng), start=1):
        cams = rng.choice(m["cameras"], size=int(rng.integers(2, m["cameras"] + 1)), replace=False)
        plan.append((pid, "bounding_box_train", sorted(rng.choice(cams, size=int(n)).tolist())))
    queries = _spread(m["query"], m["test_ids"], rng)
    gallery = _spread(m["gallery"], m["test_ids"], rng)
    for j in range(m["test_ids"]):
        cams = sorted(rng.choice(m["cameras"], size=int(queries[j]), replace=False).tolist())
        g = cams + rng.choice(cams, size=int(gallery[j]) - len(cams)).tolist()  # every camera has a match
        plan.append((m["train_ids"] + 1 + j, "query", cams))
        plan.append((m["train_ids"] + 1 + j, "bounding_box_test", sorted(g)))
    return plan


def _render_market_part(args) -> int:
    top, seed, quality, items = args
    style = STYLES["synth-a"]
    cams = [sample_camera(np.random.default_rng([seed, 78, c]), style) for c in range(MARKET_SHAPE["cameras"])]
    n = 0
    for pid, folder, plan in items:
        person = sample_identity(np.random.default_rng([seed, 79, pid]))
        for k, c in enumerate(plan):
            key = [seed, 80, pid, k, len(folder)]
            pose = _view(np.random.default_rng(key + [0]))
            img = compose(person, cams[c], style, *pose, rng=np.random.default_rng(key + [1]),
                          canvas=MARKET_SHAPE["size"], reduce=1)
            img.save(Path(top) / folder / f"{pid:04d}_c{c + 1}s1_{(k + 1) * 25:06d}_{k % 100:02d}.jpg", quality=quality)
            n += 1
    return n


def generate_market_shaped(out_dir: str | os.PathLike, seed: int = 0, *, quality: int = 92, workers: int | None = None,
                           overwrite: bool = False, progress: bool = False, ids: int | None = None) -> Path:
    """Write a Market-shaped synthetic dataset, `<out_dir>/Market-1501-v15.09.15/`: Market-1501's layout
    and counts (751 / 12,936 training ids / images, 3,368 queries, 15,913 gallery images, 6 cameras) as
    256x128 JPEGs, so `read_dataset("market1501", out_dir)` reads it and the real pipeline (disk, decode,
    augment, GPU) can be timed without the real dataset. Rendered by a process pool (`workers`, default
    all CPUs) into a temporary folder renamed into place. `ids` keeps only the first that many training and
    test identities (a small set of the same shape, for tests and `bench/gpu.py --tiny`)."""
    from concurrent.futures import ProcessPoolExecutor

    out = Path(out_dir).expanduser().resolve()
    final = out / MARKET_TOP
    if final.exists() and not overwrite:
        raise ReidRayError(f"{final} exists; delete it, pass --overwrite, or choose another folder")
    out.mkdir(parents=True, exist_ok=True)
    plan = market_plan(seed)
    if ids is not None:
        first_test = MARKET_SHAPE["train_ids"] + 1
        plan = [p for p in plan if p[0] <= ids or first_test <= p[0] < first_test + ids]
    tmp = Path(tempfile.mkdtemp(prefix=".market.", dir=out))
    try:
        top = tmp / MARKET_TOP
        for folder in ("bounding_box_train", "query", "bounding_box_test"):
            (top / folder).mkdir(parents=True)
        workers = workers or os.cpu_count() or 1
        parts = [(str(top), seed, quality, plan[i::workers * 8]) for i in range(workers * 8)]
        from reid_ray.tracking.progress import bar

        total = sum(len(c) for _, _, c in plan)
        with (bar(total, "synthesising (Market-shaped)", "images") if progress else contextlib.nullcontext()) as shown, \
                ProcessPoolExecutor(workers) as pool:
            for n in pool.map(_render_market_part, parts):
                if shown is not None:
                    shown.update(n)
        (top / "synth_meta.json").write_text(json.dumps({"generator_version": GENERATOR_VERSION, "preset": "market",
                                                         "seed": seed, "shape": MARKET_SHAPE}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(top, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
