"""Loader processes ship uint8 (`loader.ship_uint8`), the training process finishes the batch on its device:
the same tensors as the float32 batches of the old path, for every loader the methods build."""

import pytest
import torch
from torch.utils.data import DataLoader
from torchvision.transforms import v2 as T

from reid_ray.data.camstyle import CamStyleDataset
from reid_ray.data.loader import ImageDataset, LoaderConfig, build_test_loader, build_train_loader, epoch_batches, relabel
from reid_ray.data.paired import PairedLoader, build_shuffle_loader
from reid_ray.data.readers import read_dataset
from reid_ray.data.transforms import NO_BOX, TransformConfig, draw_erase_box, split_transform, train_transform
from reid_ray.data.transforms import test_transform as eval_transform

TCFG = TransformConfig(height=32, width=16, pad=2)


def _lcfg(ship: bool, workers: int = 0, decode: str = "cpu") -> LoaderConfig:
    return LoaderConfig(num_identities=4, num_instances=2, num_workers=workers, ship_uint8=ship, decode=decode)


def _source(tiny_synth):
    table = read_dataset("synth-a", tiny_synth).train
    return table, relabel(table["pid"].to_numpy())[0]


def _assert_same(got: list[dict], want: list[dict], keys: set[str]) -> None:
    """Every batch has the same keys and tensors (images to float rounding, the rest exactly)."""
    assert len(got) == len(want) > 0
    for g, w in zip(got, want):
        assert set(g) == set(w) and keys <= set(g)
        for k in g:
            if g[k].dtype == torch.float32:
                assert torch.allclose(g[k], w[k], rtol=0, atol=1e-6), k
            else:
                assert torch.equal(g[k], w[k]), k


def _raw(loader):
    """What the DataLoader collates in its processes, before the training process finishes it."""
    return next(iter(DataLoader.__iter__(loader)))


@pytest.mark.parametrize("workers", [0, 2])
def test_pk_train_loader_uint8_equals_float32(tiny_synth, workers):
    table, labels = _source(tiny_synth)
    runs = {}
    for ship in (True, False):
        loader = build_train_loader(table, labels, TCFG, _lcfg(ship, workers), seed=3)
        loader.sampler.set_epoch(1)
        runs[ship] = list(loader)
        if ship:
            raw = _raw(loader)
            assert raw["img"].dtype == torch.uint8 and raw["img__erase"].shape == (len(raw["img"]), 4)
    _assert_same(runs[True], runs[False], {"img", "label", "index"})
    imgs = torch.cat([b["img"] for b in runs[False]])
    erased = (imgs == 0).all(1).flatten(1).sum(1)  # pixels whose three channels are 0: an erasing box
    assert (erased > 0).any() and (erased == 0).any()  # the batches exercise boxes and images without one


def test_mmt_two_views_from_one_decode(tiny_synth, monkeypatch):
    table, labels = _source(tiny_synth)
    runs = {}
    for ship in (True, False):
        ds = ImageDataset(table, train_transform(TCFG), labels, views=2)
        loader = build_train_loader(table, labels, TCFG, _lcfg(ship), seed=3, dataset=ds)
        loader.sampler.set_epoch(0)
        runs[ship] = list(loader)
    _assert_same(runs[True], runs[False], {"img", "img2"})
    assert not torch.equal(runs[True][0]["img"], runs[True][0]["img2"])

    load, calls = ImageDataset._load, []
    monkeypatch.setattr(ImageDataset, "_load", staticmethod(lambda *a: calls.append(a[0]) or load(*a)))
    batch = next(iter(loader))
    assert len(calls) == len(batch["index"])  # one decode per item, for both views


def test_camstyle_and_paired_loader_uint8_equals_float32(tiny_synth):
    """ECN's loader: PK source batches zipped with CamStyle target batches (`t_img`, `t_img_cam`)."""
    table, labels = _source(tiny_synth)
    target = read_dataset("synth-b", tiny_synth).train
    runs = {}
    for ship in (True, False):
        lcfg = _lcfg(ship)
        ds = CamStyleDataset(target, train_transform(TCFG))
        assert ds.has_camstyle
        loader = PairedLoader(build_train_loader(table, labels, TCFG, lcfg, seed=3),
                              build_shuffle_loader(ds, 6, seed=3, lcfg=lcfg))
        loader.sampler.set_epoch(2)
        runs[ship] = list(epoch_batches(loader, 3))
        if ship:
            raw = _raw(loader.target)
            assert raw["img_cam"].dtype == torch.uint8 and raw["img_cam__erase"].dtype == torch.int32
    _assert_same(runs[True], runs[False], {"img", "t_img", "t_img_cam", "t_index"})
    assert not any(k.endswith("__erase") for k in runs[True][0])


def test_test_loader_and_decode_on_the_device_equal_float32(tiny_synth):
    table, labels = _source(tiny_synth)
    runs = {}
    for ship, decode in ((False, "cpu"), (True, "cpu"), (True, "device"), (False, "device")):
        lcfg = _lcfg(ship, decode=decode)
        ds = ImageDataset(table, train_transform(TCFG), labels, views=2)
        loader = build_train_loader(table, labels, TCFG, lcfg, seed=3, dataset=ds)
        loader.sampler.set_epoch(4)
        test = build_test_loader(table, TCFG, lcfg)
        runs[ship, decode] = list(loader), list(test)
        if ship or decode == "device":
            assert _raw(test)["index"].dtype == torch.int64 and "img__erase" not in _raw(test)
    ref_train, ref_test = runs[False, "cpu"]
    assert ref_test[0]["img"].dtype == torch.float32
    for key, (train, test) in runs.items():
        _assert_same(train, ref_train, {"img", "img2"})
        _assert_same(test, ref_test, {"img", "pid", "camid"})


@pytest.mark.parametrize("decode", ["cpu", "device"])
def test_finishing_leaves_the_rng_state_alone(tiny_synth, decode):
    table, labels = _source(tiny_synth)
    loader = build_train_loader(table, labels, TCFG, _lcfg(True, decode=decode), seed=3)
    raw = _raw(loader)
    assert raw["encoded" if decode == "device" else "img"].dtype == torch.uint8
    state = torch.get_rng_state()
    loader.finish(raw)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("cfg, no_boxes", [
    (TransformConfig(height=32, width=16, pad=2, erasing_prob=0.7), range(1, 40)),
    (TransformConfig(height=32, width=16, pad=0, erasing_prob=1.0), range(0, 40)),
    # every try too tall for the image: no box, after ten tries' draws
    (TransformConfig(height=32, width=16, pad=2, erasing_prob=1.0, erasing_scale=(0.9, 0.95), erasing_ratio=(3, 3.3)),
     range(40, 41)),
])
def test_erasing_draws_are_the_full_transforms(tiny_synth, cfg, no_boxes):
    """The geometric steps + `draw_erase_box` consume torch's RNG exactly as the whole v2 transform does,
    and their box is where the whole transform erased."""
    img = ImageDataset._load(read_dataset("synth-a", tiny_synth).train["path"][0].as_py())
    full, split = train_transform(cfg), split_transform(train_transform(cfg))
    boxes = []
    for seed in range(40):
        torch.manual_seed(seed)
        want, want_next = full(img), torch.rand(1)
        torch.manual_seed(seed)
        x = split.uint8(img)
        box = draw_erase_box(split.erasing, tuple(x.shape))
        assert torch.equal(torch.rand(1), want_next), seed  # the same number of draws, in the same order
        top, left, h, w = box.tolist()
        assert (want[:, top:top + h, left:left + w] == 0).all()
        norm = T.Normalize(split.mean, split.std)(x.float() / 255)
        norm[:, top:top + h, left:left + w] = 0
        assert torch.allclose(norm, want, rtol=0, atol=1e-6)
        boxes.append(tuple(box.tolist()))
    assert sum(b == NO_BOX for b in boxes) in no_boxes


def test_an_unsplittable_transform_ships_float(tiny_synth):
    """A transform with steps after the float conversion that are not BoT's runs whole in the loader processes."""
    table, labels = _source(tiny_synth)
    tf = T.Compose([T.ToImage(), T.Resize((32, 16)), T.ToDtype(torch.float32, scale=True), T.ColorJitter(0.4)])
    assert split_transform(tf) is None and split_transform(eval_transform(TCFG)).erasing is None
    ds = ImageDataset(table, tf, labels)
    loader = build_train_loader(table, labels, TCFG, _lcfg(True), dataset=ds)
    assert type(loader) is DataLoader and _raw(loader)["img"].dtype == torch.float32
