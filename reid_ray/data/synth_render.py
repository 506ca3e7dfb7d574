"""Rendering of the synthetic benchmark: identities, cameras, backgrounds, composition.

Pure functions of numpy Generators (see `synthetic.py` for the dataset writer and
the design rationale). Everything is drawn at 128x64 and box-downsampled to 64x32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

# Clothing palette (RGB in [0, 1]); both domains draw from it.
PALETTE = np.array([
    [0.85, 0.10, 0.10], [0.50, 0.05, 0.08], [0.95, 0.50, 0.10], [0.95, 0.85, 0.15],
    [0.15, 0.65, 0.20], [0.05, 0.35, 0.12], [0.10, 0.60, 0.60], [0.45, 0.70, 0.95],
    [0.10, 0.25, 0.85], [0.05, 0.08, 0.35], [0.50, 0.15, 0.65], [0.95, 0.50, 0.70],
    [0.95, 0.95, 0.95], [0.55, 0.55, 0.55], [0.08, 0.08, 0.08], [0.45, 0.28, 0.12],
    [0.85, 0.75, 0.55],
], dtype=np.float32)
SKIN = np.array([[0.96, 0.80, 0.69], [0.87, 0.67, 0.52], [0.70, 0.50, 0.35], [0.45, 0.30, 0.20]], np.float32)
HAIR = np.array([[0.05, 0.04, 0.03], [0.30, 0.18, 0.08], [0.80, 0.65, 0.35], [0.60, 0.60, 0.60]], np.float32)
PATTERNS = ("solid", "hstripes", "vstripes", "checks", "twotone")
CANVAS = (128, 64)  # drawing size (H, W); images are box-downsampled by 2


@dataclass(frozen=True)
class DomainStyle:
    """Ranges a domain's cameras draw their style from (final-resolution units)."""

    bg_value: tuple[float, float]
    bg_saturation: tuple[float, float]
    gain: tuple[float, float]
    contrast: tuple[float, float]
    cast: tuple[tuple[float, float], tuple[float, float], tuple[float, float]]  # per RGB channel
    blur_sigma: tuple[float, float]
    noise_std: tuple[float, float]
    scale: tuple[float, float]


STYLES = {
    "synth-a": DomainStyle(bg_value=(0.62, 0.85), bg_saturation=(0.0, 0.12), gain=(0.95, 1.08),
                           contrast=(0.95, 1.05), cast=((0.96, 1.04), (0.96, 1.04), (0.96, 1.04)),
                           blur_sigma=(0.0, 0.25), noise_std=(0.005, 0.015), scale=(0.92, 1.0)),
    # Measured (bench/RESULTS.md): a coloured background is the strongest gap for a source-trained
    # network (direct transfer near zero), so synth-b keeps near-grey but darker backgrounds and puts the
    # rest of its gap in illumination, cast, blur, noise and scale.
    "synth-b": DomainStyle(bg_value=(0.42, 0.60), bg_saturation=(0.0, 0.10), gain=(0.78, 0.92),
                           contrast=(0.82, 0.92), cast=((0.82, 0.90), (0.92, 0.98), (1.06, 1.14)),
                           blur_sigma=(0.5, 1.0), noise_std=(0.025, 0.045), scale=(0.84, 0.91)),
}


# --------------------------------------------------------------------------- identities

def _colour(rng, exclude: int | None = None) -> tuple[int, np.ndarray]:
    i = int(rng.integers(len(PALETTE)))
    if exclude is not None and i == exclude:
        i = (i + 1 + int(rng.integers(len(PALETTE) - 1))) % len(PALETTE)
    return i, np.clip(PALETTE[i] + rng.normal(0, 0.03, 3), 0, 1).astype(np.float32)


def sample_identity(rng: np.random.Generator) -> dict:
    """Attributes of one person; the same distribution for every domain."""
    up_i, upper = _colour(rng)
    _, upper2 = _colour(rng, exclude=up_i)
    lo_i, lower = _colour(rng)
    _, lower2 = _colour(rng, exclude=lo_i)
    return {
        "skin": SKIN[rng.integers(len(SKIN))], "hair": HAIR[rng.integers(len(HAIR))],
        "long_hair": rng.random() < 0.3,
        "upper": upper, "upper2": upper2, "upper_pattern": PATTERNS[rng.integers(len(PATTERNS))],
        "stripe": int(rng.integers(3, 7)), "long_sleeves": rng.random() < 0.5,
        "logo": rng.random() < 0.4,
        "lower": lower, "lower2": lower2, "lower_type": ("trousers", "shorts", "skirt")[rng.choice(3, p=[.6, .25, .15])],
        "lower_pattern": ("solid", "solid", "hstripes", "checks")[rng.integers(4)],
        "shoes": _colour(rng)[1] * 0.6,
        "backpack": _colour(rng)[1] if rng.random() < 0.35 else None,
        "handbag": _colour(rng)[1] if rng.random() < 0.2 else None,
        "hat": _colour(rng)[1] if rng.random() < 0.15 else None,
        "height": float(rng.uniform(0.86, 1.0)), "width": float(rng.uniform(0.85, 1.15)),
        "leg_ratio": float(rng.uniform(0.44, 0.52)),
    }


def _pattern(kind: str, yy, xx, size: int):
    if kind == "hstripes":
        return (yy // size) % 2 == 1
    if kind == "vstripes":
        return (xx // size) % 2 == 1
    if kind == "checks":
        return ((yy // size) + (xx // size)) % 2 == 1
    return np.zeros_like(yy, dtype=bool)


def _box(yy, xx, y0, y1, x0, x1):
    return (yy >= y0) & (yy < y1) & (xx >= x0) & (xx < x1)


def render_person(p: dict, yy: np.ndarray, xx: np.ndarray, view: str, stride: float,
                  accessories: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Paint a person on canonical coordinates (yy, xx); returns (rgb HxWx3, alpha HxW).

    The canonical frame is 128x64 with feet at y=124 and the body centred at x=32;
    `view` is front/back/side. Painting order is back to front.
    """
    rgb = np.zeros(yy.shape + (3,), np.float32)
    alpha = np.zeros(yy.shape, bool)

    def paint(mask, colour):
        rgb[mask] = colour
        alpha[mask] = True

    H = 112.0 * p["height"]
    top, cx = 124.0 - H, 32.0
    shoulder, hip = top + 0.16 * H, 124.0 - p["leg_ratio"] * H
    hw = 0.1 * H * p["width"] * (0.68 if view == "side" else 1.0)
    head_r = 0.075 * H
    head_cy = top + head_r

    # back-most: long hair seen from behind, and a backpack seen from the side
    if p["long_hair"] and view == "back":
        paint(_box(yy, xx, head_cy, shoulder + 0.1 * H, cx - head_r, cx + head_r), p["hair"])
    if accessories and p["backpack"] is not None and view == "side":
        paint(_box(yy, xx, shoulder + 2, shoulder + 0.55 * (hip - shoulder) + 6, cx + hw - 1, cx + hw + 6), p["backpack"])
    # legs, with the walking stride as horizontal offsets
    leg_w = hw * 0.85
    for sgn in (-1, 1):
        x0 = cx + sgn * (0.5 + stride) - (leg_w if sgn < 0 else 0)
        leg = _box(yy, xx, hip, 121, x0, x0 + leg_w)
        covered = {"trousers": 121, "shorts": hip + 0.38 * (121 - hip), "skirt": hip}[p["lower_type"]]
        cloth = leg & (yy < covered)
        paint(leg & ~cloth, p["skin"])
        paint(cloth, p["lower"])
        paint(cloth & _pattern(p["lower_pattern"], yy, xx, p["stripe"]), p["lower2"])
        paint(_box(yy, xx, 121, 125, x0 - (1 if view == "side" else 0), x0 + leg_w + 1), p["shoes"])
    if p["lower_type"] == "skirt":
        flare = np.clip((yy - hip) / (0.5 * (121 - hip)), 0, 1) * 4
        skirt = (yy >= hip) & (yy < hip + 0.5 * (121 - hip)) & (np.abs(xx - cx) < hw + flare)
        paint(skirt, p["lower"])
        paint(skirt & _pattern(p["lower_pattern"], yy, xx, p["stripe"]), p["lower2"])
    # torso
    torso = _box(yy, xx, shoulder, hip + 2, cx - hw, cx + hw)
    paint(torso, p["upper"])
    pat = p["upper_pattern"]
    second = (yy > (shoulder + hip) / 2) if pat == "twotone" else _pattern(pat, yy, xx, p["stripe"])
    paint(torso & second, p["upper2"])
    if view == "front" and p["logo"]:
        paint(_box(yy, xx, shoulder + 5, shoulder + 11, cx - 3, cx + 3), p["upper2"] * 0.5 + 0.5 * (1 - p["upper"]))
    # arms swing opposite to the legs
    arm_len, arm_w = 0.36 * H, max(3.0, 0.35 * hw)
    sides = (1,) if view == "side" else (-1, 1)
    for sgn in sides:
        x0 = cx + hw if sgn > 0 else cx - hw - arm_w
        if view == "side":
            x0 = cx - arm_w / 2 - stride
        arm = _box(yy, xx, shoulder + 1, shoulder + arm_len, x0, x0 + arm_w)
        sleeve = arm & (yy < shoulder + (arm_len - 4 if p["long_sleeves"] else 0.35 * arm_len))
        paint(arm & ~sleeve, p["skin"])
        paint(sleeve, p["upper"])
    # accessories in front of the torso
    if accessories and p["backpack"] is not None:
        if view == "back":
            paint(_box(yy, xx, shoulder + 3, shoulder + 0.7 * (hip - shoulder) + 3, cx - 0.75 * hw, cx + 0.75 * hw),
                  p["backpack"])
        elif view == "front":
            for sx in (-0.6 * hw, 0.6 * hw - 2):
                paint(_box(yy, xx, shoulder, shoulder + 0.5 * (hip - shoulder), cx + sx, cx + sx + 2), p["backpack"])
    if accessories and p["handbag"] is not None:
        paint(_box(yy, xx, hip - 4, hip + 7, cx + hw + 1, cx + hw + 8), p["handbag"])
    # head, hair, hat
    head = ((yy - head_cy) / head_r) ** 2 + ((xx - cx) / (0.8 * head_r)) ** 2 <= 1
    paint(head, p["skin"])
    if view == "back":
        paint(head, p["hair"])
    else:
        paint(head & (yy < head_cy - 0.3 * head_r), p["hair"])
        if view == "side":
            paint(head & (xx > cx + 0.2 * head_r), p["hair"])
        if p["long_hair"]:
            for sgn in (-1, 1):
                paint(_box(yy, xx, head_cy - 0.3 * head_r, shoulder + 4, cx + sgn * 0.8 * head_r - 1.5,
                           cx + sgn * 0.8 * head_r + 1.5), p["hair"])
    if accessories and p["hat"] is not None:
        paint(head & (yy < head_cy - 0.45 * head_r), p["hat"])
        paint(_box(yy, xx, head_cy - 0.55 * head_r, head_cy - 0.3 * head_r, cx - head_r - 2, cx + head_r + 2), p["hat"])
    return rgb, alpha


# --------------------------------------------------------------------------- cameras

def sample_camera(rng: np.random.Generator, style: DomainStyle) -> dict:
    u = lambda lo_hi: float(rng.uniform(*lo_hi))  # noqa: E731
    return {
        "bg_hue": float(rng.uniform(0, 1)), "bg_value": u(style.bg_value), "bg_sat": u(style.bg_saturation),
        "gain": u(style.gain), "contrast": u(style.contrast),
        "cast": np.array([u(c) for c in style.cast], np.float32),
        "blur": u(style.blur_sigma), "noise": u(style.noise_std), "scale": u(style.scale),
    }


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    k = (np.array([5.0, 3.0, 1.0]) + h * 6) % 6
    return (v - v * s * np.clip(np.minimum(k, 4 - k), 0, 1)).astype(np.float32)


def _smooth_noise(rng, shape, cells: tuple[int, int]) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: a coarse random grid, bilinearly upsampled."""
    coarse = Image.fromarray(rng.uniform(0, 255, cells).astype(np.uint8), mode="L")
    return np.asarray(coarse.resize(shape[::-1], Image.BILINEAR), np.float32) / 127.5 - 1


def render_background(rng, cam: dict, style: DomainStyle, canvas: tuple[int, int] = CANVAS) -> np.ndarray:
    """A fresh background per image, in the camera's colour and brightness range."""
    h, w = canvas
    k = h / CANVAS[0]  # lengths below are in units of the 128-row canvas
    hue = (cam["bg_hue"] + rng.normal(0, 0.04)) % 1
    value = np.clip(cam["bg_value"] + rng.normal(0, 0.04), *style.bg_value)
    base = _hsv_to_rgb(hue, np.clip(cam["bg_sat"] + rng.normal(0, 0.05), 0, 1), value)
    shade = 1 + 0.25 * _smooth_noise(rng, (h, w), (int(rng.integers(3, 7)), int(rng.integers(2, 5))))
    yy = np.arange(h, dtype=np.float32)[:, None]
    floor_y = rng.uniform(80, 112) * k
    shade = shade * np.where(yy > floor_y, rng.uniform(0.75, 1.2), 1.0) * (1 + rng.uniform(-0.15, 0.15) * (yy / h - 0.5))
    bg = base[None, None, :] * shade[..., None]
    if rng.random() < 0.5:  # a pole, door or window edge
        x0 = int(rng.integers(0, w - int(6 * k)))
        bg[:, x0:x0 + int(rng.integers(3, 10) * k)] *= rng.uniform(0.6, 1.4)
    return bg


def compose(person: dict, cam: dict, style: DomainStyle, view: str, stride: float, mirror: bool,
            jitter: tuple[float, float, float], rng: np.random.Generator, canvas: tuple[int, int] = CANVAS,
            reduce: int = 2) -> Image.Image:
    """Render `person` as seen by camera `cam` on a `canvas` (H, W), box-downsampled by `reduce`: the
    embedded benchmark's 64x32 by default; (256, 128) with reduce 1 for Market-sized images."""
    h, w = canvas
    k = h / CANVAS[0]
    s = cam["scale"] * jitter[0] * k
    oy = h - 3 * k - 124 * s + jitter[1] * k
    ox = w / 2 - 32 * s + jitter[2] * k
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cxx = (yy - oy) / s, (xx - ox) / s
    if mirror:
        cxx = 64 - cxx
    rgb, alpha = render_person(person, cy, cxx, view, stride)
    img = np.where(alpha[..., None], rgb, render_background(rng, cam, style, canvas))
    gain = cam["gain"] * rng.uniform(0.95, 1.05)
    img = ((img - 0.5) * cam["contrast"] + 0.5) * gain * cam["cast"]
    pil = Image.fromarray((np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8))
    if cam["blur"] > 0.05:  # sigma in pixels of a 32-wide image, scaled to the canvas
        pil = pil.filter(ImageFilter.GaussianBlur(radius=cam["blur"] * w / 32))
    small = np.asarray(pil.reduce(reduce) if reduce > 1 else pil, np.float32)
    small += rng.normal(0, cam["noise"] * 255, small.shape)
    return Image.fromarray(np.clip(small + 0.5, 0, 255).astype(np.uint8))


def render_texture(person: dict) -> Image.Image:
    """The identity's aligned texture map: canonical front (left) and back (right) views.

    One body template for everyone (no proportions, pose or accessories), so the
    same pixel is the same body part for every identity, on a neutral background.
    """
    canon = dict(person, height=1.0, width=1.0, leg_ratio=0.48)
    yy, xx = np.mgrid[0:CANVAS[0], 0:CANVAS[1]].astype(np.float32)
    halves = []
    for view in ("front", "back"):
        rgb, alpha = render_person(canon, yy, xx, view, stride=0.0, accessories=False)
        halves.append(np.where(alpha[..., None], rgb, 0.5))
    return Image.fromarray((np.concatenate(halves, axis=1) * 255 + 0.5).astype(np.uint8)).reduce(2)
