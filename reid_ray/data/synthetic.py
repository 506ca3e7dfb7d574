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

Design (measured in ../shared/SYNTHETIC_NOTES.md): identity cues (clothing
colours, patterns, body proportions, accessories) are drawn from the SAME
distribution in both domains; the domain gap lives in what a camera changes
(background, illumination, colour cast, contrast, blur, noise, scale), with
disjoint ranges: synth-a is light, near-grey, sharp; synth-b is darker,
blurred, noisy, smaller and bluish on every camera. Backgrounds are redrawn per image so
that no fixed texture fingerprints a camera.
"""

from __future__ import annotations

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


def _write_domain(top: Path, domain: str, cfg: SynthConfig, progress=None) -> None:
    style = STYLES[domain]
    cams = [sample_camera(_rng(cfg, domain, 0, c), style) for c in range(cfg.num_cameras)]
    folders = ("bounding_box_train", "query", "bounding_box_test", "camstyle", "texture")
    for f in folders:
        (top / f).mkdir(parents=True)
    frame = [0] * cfg.num_cameras
    for pid in range(1, cfg.train_ids + cfg.test_ids + 1):
        person = sample_identity(_rng(cfg, domain, 1, pid))
        plan = _plan_identity(_rng(cfg, domain, 2, pid), cfg)
        is_train = pid <= cfg.train_ids
        seen_query = set()
        for k, c in enumerate(plan):
            frame[c] += 25
            name = f"{pid:04d}_c{c + 1}s1_{frame[c]:06d}_{k:02d}"
            pose = _view(_rng(cfg, domain, 3, pid, k))
            img = compose(person, cams[c], style, *pose, rng=_rng(cfg, domain, 4, pid, k))
            if is_train:
                folder = "bounding_box_train"
            else:
                folder = "bounding_box_test" if c in seen_query else "query"
                seen_query.add(c)
            img.save(top / folder / f"{name}.jpg", quality=cfg.jpeg_quality)
            if is_train and cfg.camstyle:
                for c2 in range(cfg.num_cameras):
                    if c2 != c:  # the same person and pose, through camera c2
                        fake = compose(person, cams[c2], style, *pose, rng=_rng(cfg, domain, 5, pid, k, c2))
                        fake.save(top / "camstyle" / f"{name}_fake_{c + 1}to{c2 + 1}.jpg", quality=cfg.jpeg_quality)
        if cfg.texture:
            render_texture(person).save(top / "texture" / f"{pid:04d}.png")
        if progress is not None:
            progress()
    (top / "synth_meta.json").write_text(json.dumps(_meta(domain, cfg), indent=2, sort_keys=True))


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
    place, so an interrupted run never leaves a half-written dataset.
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
    bar = None
    if progress and todo:
        from tqdm import tqdm
        bar = tqdm(total=len(todo) * (config.train_ids + config.test_ids), desc="synthesising", unit="id")
    for domain in todo:
        tmp = Path(tempfile.mkdtemp(prefix=f".{domain}.", dir=out))
        try:
            _write_domain(tmp / domain, domain, config, bar.update if bar is not None else None)
            if (out / domain).exists():
                shutil.rmtree(out / domain)
            os.replace(tmp / domain, out / domain)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if bar is not None:
        bar.close()
    return [out / d for d in config.domains]
