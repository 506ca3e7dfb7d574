from collections import Counter

import numpy as np
import pytest

from reid_ray import ReidRayError
from reid_ray.data.sampler import PKSampler

LABELS = np.repeat(np.arange(20), [3, 5, 8, 4, 6, 2, 9, 4, 4, 5, 7, 4, 4, 3, 6, 10, 4, 5, 4, 4])


def batches(sampler, per_rank):
    idx = [i for i, _ in sampler]
    return [idx[i:i + per_rank] for i in range(0, len(idx), per_rank)]


def test_every_batch_is_p_identities_times_k_images():
    s = PKSampler(LABELS, num_instances=4, num_identities=4, seed=3)
    bs = batches(s, 16)
    assert len(bs) > 3 and len(list(s)) == len(s)
    for b in bs:
        counts = Counter(LABELS[b].tolist())
        assert len(counts) == 4 and set(counts.values()) == {4}


def test_ranks_take_disjoint_shares_whose_union_is_the_single_process_batch():
    single = batches(PKSampler(LABELS, 4, 4, num_replicas=1, seed=7), 16)
    shares = [batches(PKSampler(LABELS, 4, 4, num_replicas=2, rank=r, seed=7), 8) for r in range(2)]
    assert len(shares[0]) == len(shares[1]) == len(single)
    for whole, a, b in zip(single, *shares):
        assert not set(LABELS[a]) & set(LABELS[b])  # different identities on each rank
        assert a + b == whole


def test_deterministic_per_seed_and_epoch():
    a, b = PKSampler(LABELS, 4, 4, seed=1), PKSampler(LABELS, 4, 4, seed=1)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    assert list(PKSampler(LABELS, 4, 4, seed=2)) != first


def test_negative_labels_are_never_sampled():
    labels = LABELS.copy()
    labels[:20] = -1
    assert all(labels[i] >= 0 for i, _ in PKSampler(labels, 4, 4))


def test_augmentation_seeds_do_not_depend_on_the_worker_count():
    single = list(PKSampler(LABELS, 4, 4, seed=7))
    split = [list(PKSampler(LABELS, 4, 4, num_replicas=2, rank=r, seed=7)) for r in range(2)]
    assert sorted(single) == sorted(split[0] + split[1])  # same (index, seed) pairs
    assert len({seed for _, seed in single}) == len(single)  # every sample its own draw


def test_p_must_divide_over_workers():
    with pytest.raises(ReidRayError, match="multiple of the worker count"):
        PKSampler(LABELS, 4, 5, num_replicas=2)


def _cross_camera_data():
    # labels: a cluster over cameras 0/1/2, a one-camera cluster, two un-clustered instances (their own labels)
    labels = [0, 0, 0, 0, 0, 1, 1, 1, 2, 3]
    cams = [0, 0, 1, 2, 1, 3, 3, 3, 0, 1]
    return labels, cams


def test_cross_camera_sampler_is_deterministic_and_visits_every_label_once():
    from reid_ray.data.sampler import CrossCameraSampler

    labels, cams = _cross_camera_data()
    s = CrossCameraSampler(labels, cams, num_instances=4, batch_size=2, seed=3)
    stream = s.stream()
    assert stream == CrossCameraSampler(labels, cams, num_instances=4, batch_size=2, seed=3).stream()
    # groups of K for the clusters, one image for each un-clustered instance: 4 + 4 + 1 + 1
    assert len(stream) == 10 and sorted({labels[i] for i in stream}) == [0, 1, 2, 3]
    assert stream.count(8) == 1 and stream.count(9) == 1
    s.set_epoch(1)
    again = CrossCameraSampler(labels, cams, num_instances=4, batch_size=2, seed=3)
    again.set_epoch(1)
    assert s.stream() == again.stream()  # each pass is a function of (seed, epoch)
    passes = {tuple(CrossCameraSampler(labels, cams, 4, 2, seed=3).stream())}
    for e in range(1, 5):
        again.set_epoch(e)
        passes.add(tuple(again.stream()))
    assert len(passes) > 1  # and the passes differ


def test_cross_camera_sampler_prefers_other_cameras():
    from reid_ray.data.sampler import CrossCameraSampler

    labels, cams = _cross_camera_data()
    for seed in range(20):
        stream = CrossCameraSampler(labels, cams, num_instances=4, batch_size=2, seed=seed).stream()
        for g in range(len(stream)):
            if labels[stream[g]] == 0 and (g == 0 or labels[stream[g - 1]] != 0):  # the cluster's anchor
                anchor, rest = stream[g], stream[g + 1:g + 4]
                assert all(cams[i] != cams[anchor] for i in rest), (seed, anchor, rest)
        one_cam = [i for i in stream if labels[i] == 1]
        assert len(one_cam) == 4 and set(one_cam) <= {5, 6, 7}  # no other camera: its own camera's images


def test_cross_camera_sampler_ranks_partition_every_global_batch():
    from reid_ray.data.sampler import CrossCameraSampler

    labels, cams = _cross_camera_data()
    one = list(CrossCameraSampler(labels, cams, 4, batch_size=4, seed=1))
    ranks = [list(CrossCameraSampler(labels, cams, 4, batch_size=4, num_replicas=2, rank=r, seed=1)) for r in (0, 1)]
    merged = [x for b in range(len(one) // 4) for r in (0, 1) for x in ranks[r][2 * b:2 * b + 2]]
    assert merged == one and len(one) == 8  # 10 images cut into batches of 4: the partial one is dropped


@pytest.mark.parametrize("in_memory", [False, True])
def test_augmented_batches_do_not_depend_on_the_loader_processes(tiny_synth, in_memory):
    """Each sample's augmentation is seeded by its place in the global batch, so 0 or 2 loader processes
    (decoding JPEGs with torchvision.io, transforms v2) give the same tensors."""
    import torch

    from reid_ray.data.loader import LoaderConfig, auto_loader_workers, build_train_loader, loader_workers, relabel
    from reid_ray.data.readers import read_dataset
    from reid_ray.data.transforms import TransformConfig

    table = read_dataset("synth-a", tiny_synth).train
    labels, _ = relabel(table["pid"].to_numpy())
    tcfg = TransformConfig(height=32, width=16, pad=2)
    out = []
    for workers in (0, 2):
        lcfg = LoaderConfig(num_identities=4, num_instances=2, num_workers=workers, in_memory=in_memory)
        loader = build_train_loader(table, labels, tcfg, lcfg, seed=3)
        loader.sampler.set_epoch(1)
        out.append([(b["img"], b["index"]) for b in loader])
    assert len(out[0]) == len(out[1]) > 0
    for (a, ia), (b, ib) in zip(*out):
        assert torch.equal(ia, ib) and torch.equal(a, b)
    assert out[0][0][0].dtype == torch.float32 and out[0][0][0].shape[1:] == (3, 32, 16)
    assert loader_workers(LoaderConfig(num_workers=-1, in_memory=True)) == 0  # auto: none for in-memory data
    # auto: one per CPU of the training worker but one (a 16-CPU GPU worker: 15), at most 32
    assert [auto_loader_workers(c) for c in (1, 2, 16, 33, 64)] == [0, 1, 15, 32, 32]


def test_decoding_on_the_device_gives_the_batches_of_the_loader_processes(tiny_synth, tmp_path):
    """`loader.decode=device`: the loader processes read the files, the training process decodes and augments
    them (here on the CPU, the device this machine has) under each sample's seed: the same tensors as decoding
    in 0 or 2 loader processes, for MMT's two views, the test loader, and a PNG among the JPEGs; decoding
    leaves the training process's RNG state as it was."""
    import pyarrow as pa
    import torch
    from PIL import Image

    from reid_ray.data.loader import ImageDataset, LoaderConfig, build_test_loader, build_train_loader, relabel
    from reid_ray.data.readers import read_dataset
    from reid_ray.data.transforms import TransformConfig, train_transform

    table = read_dataset("synth-a", tiny_synth).train
    paths = table["path"].to_pylist()
    png = tmp_path / "first.png"
    Image.open(paths[0]).save(png)
    table = table.set_column(table.schema.get_field_index("path"), "path", pa.array([str(png)] + paths[1:]))
    labels, _ = relabel(table["pid"].to_numpy())
    tcfg = TransformConfig(height=32, width=16, pad=2)
    runs = {}
    for workers, decode in ((0, "cpu"), (0, "device"), (2, "device")):
        lcfg = LoaderConfig(num_identities=4, num_instances=2, num_workers=workers, decode=decode)
        ds = ImageDataset(table, train_transform(tcfg), labels, views=2)
        loader = build_train_loader(table, labels, tcfg, lcfg, seed=3, dataset=ds)
        assert ds.decode == decode
        loader.sampler.set_epoch(1)
        batches = [(b["img"], b["img2"], b["index"], b["label"]) for b in loader]
        test = [b["img"] for b in build_test_loader(table, tcfg, lcfg)]
        runs[workers, decode] = batches, test
        if decode == "device":
            raw = next(iter(torch.utils.data.DataLoader.__iter__(loader)))  # collated, not yet decoded
            assert raw["encoded"].dtype == torch.uint8 and raw["encoded"].dim() == 1 and "img" not in raw
            state = torch.get_rng_state()
            assert torch.equal(loader.finish(raw, torch.device("cpu"))["img"], batches[0][0])
            assert torch.equal(torch.get_rng_state(), state)
    ref_batches, ref_test = runs[0, "cpu"]
    assert 0 in torch.cat([b[2] for b in ref_batches]).tolist()  # the PNG was drawn
    for key in ((0, "device"), (2, "device")):
        batches, test = runs[key]
        assert len(batches) == len(ref_batches) > 0 and len(test) == len(ref_test)
        for got, want in zip(batches, ref_batches):
            assert all(torch.equal(g, w) for g, w in zip(got, want)), key
            assert not torch.equal(got[0], got[1])  # two views, two augmentations
        assert all(torch.equal(g, w) for g, w in zip(test, ref_test)), key


def test_loader_decode_takes_cpu_or_device():
    from reid_ray.config import resolve_config

    with pytest.raises(ReidRayError, match=r"loader.decode='gpu'; valid: cpu, device"):
        resolve_config("baseline", sets=["loader.decode=gpu"])
