import hashlib

import numpy as np
import pytest
from PIL import Image

from reid_ray import ReidRayError
from reid_ray.data.readers import read_dataset
from reid_ray.data.synthetic import SynthConfig, generate_synthetic
from tests.conftest import TINY


def digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path, tiny_synth):
    cfg = SynthConfig(**{**TINY.__dict__, "domains": ("synth-b",)})
    generate_synthetic(tmp_path / "again", cfg)
    assert digest(tmp_path / "again" / "synth-b") == digest(tiny_synth / "synth-b")
    generate_synthetic(tmp_path / "other", SynthConfig(**{**cfg.__dict__, "seed": 1}))
    assert digest(tmp_path / "other" / "synth-b") != digest(tiny_synth / "synth-b")


def test_one_process_writes_the_bytes_of_the_pool(tmp_path, tiny_synth, monkeypatch):
    """The identities are rendered by one forked process per CPU; on one CPU, in-process: the same files."""
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    generate_synthetic(tmp_path / "one", TINY)
    for domain in ("synth-a", "synth-b"):
        assert digest(tmp_path / "one" / domain) == digest(tiny_synth / domain)


def test_market_layout_read_back(tiny_synth):
    for name in ("synth-a", "synth-b"):
        ds = read_dataset(name, tiny_synth)
        st = ds.stats()
        assert st["train"]["ids"] == TINY.train_ids
        assert st["query"]["ids"] == st["gallery"]["ids"] == TINY.test_ids
        assert not set(ds.train["pid"].to_pylist()) & set(ds.query["pid"].to_pylist())
        with Image.open(ds.train["path"][0].as_py()) as im:
            assert im.size == (32, 64)
        # every query has a gallery match in another camera (the protocol needs one)
        g = list(zip(ds.gallery["pid"].to_pylist(), ds.gallery["camid"].to_pylist()))
        for pid, cam in zip(ds.query["pid"].to_pylist(), ds.query["camid"].to_pylist()):
            assert any(p == pid and c != cam for p, c in g)


def test_camstyle_and_texture_files(tiny_synth):
    top = tiny_synth / "synth-a"
    train = sorted((top / "bounding_box_train").glob("*.jpg"))
    fakes = {p.name for p in (top / "camstyle").glob("*.jpg")}
    assert len(fakes) == len(train) * (TINY.num_cameras - 1)
    name = train[0].stem
    cam = int(name.split("_c")[1][0])
    others = [c for c in range(1, TINY.num_cameras + 1) if c != cam]
    assert {f"{name}_fake_{cam}to{c}.jpg" for c in others} <= fakes
    textures = sorted((top / "texture").glob("*.png"))
    assert len(textures) == TINY.train_ids + TINY.test_ids
    assert textures[0].name == "0001.png"


def test_domains_differ_in_camera_not_in_identity_cues(tiny_synth):
    def mean_brightness(name):
        ds = read_dataset(name, tiny_synth)
        return np.mean([np.asarray(Image.open(p)).mean() for p in ds.train["path"].to_pylist()[:40]])

    # synth-a is light, synth-b dark: disjoint camera ranges make a real gap
    assert mean_brightness("synth-a") > mean_brightness("synth-b") + 50
    # identities are drawn from the same distribution: textures (camera-free) look alike on average
    ta = np.mean([np.asarray(Image.open(p)) for p in sorted((tiny_synth / "synth-a" / "texture").glob("*.png"))], 0)
    tb = np.mean([np.asarray(Image.open(p)) for p in sorted((tiny_synth / "synth-b" / "texture").glob("*.png"))], 0)
    assert abs(ta.mean() - tb.mean()) < 20


def test_market_shaped_plan_has_markets_counts():
    from reid_ray.data.synthetic import MARKET_SHAPE, market_plan

    plan = market_plan(seed=0)
    train = [c for _, f, c in plan if f == "bounding_box_train"]
    query = [(p, c) for p, f, c in plan if f == "query"]
    gallery = {p: c for p, f, c in plan if f == "bounding_box_test"}
    assert len(train) == 751 and sum(map(len, train)) == MARKET_SHAPE["train_images"] == 12_936
    assert len(query) == 750 and sum(len(c) for _, c in query) == 3_368
    assert sum(map(len, gallery.values())) == 15_913
    for pid, cams in query:  # one query per camera, each with a gallery match in its camera and another
        assert len(set(cams)) == len(cams) >= 4 and set(gallery[pid]) == set(cams)
    assert market_plan(seed=0) == plan and market_plan(seed=1) != plan


def test_market_shaped_images_read_as_market1501(tmp_path):
    from reid_ray.data.readers import read_dataset
    from reid_ray.data.synthetic import generate_market_shaped

    top = generate_market_shaped(tmp_path, ids=3, workers=1)
    assert top.name == "Market-1501-v15.09.15"
    ds = read_dataset("market1501", tmp_path, use_cache=False)
    st = ds.stats()
    assert st["train"]["ids"] == 3 and st["query"]["ids"] == 3 == st["gallery"]["ids"]
    from PIL import Image
    with Image.open(ds.train["path"][0].as_py()) as im:
        assert im.size == (128, 256) and im.format == "JPEG"
    with pytest.raises(ReidRayError, match="exists"):
        generate_market_shaped(tmp_path, ids=1, workers=1)
