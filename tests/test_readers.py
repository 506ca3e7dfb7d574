from pathlib import Path

import pytest

from reid_ray.data.readers import DatasetError, read_dataset


def touch(folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        (folder / n).write_bytes(b"x")


def market_tree(root: Path, top="Market-1501-v15.09.15") -> Path:
    d = root / top
    touch(d / "bounding_box_train", "0002_c1s1_000451_03.jpg", "0002_c2s1_000551_01.jpg", "0007_c3s3_077419_03.jpg",
          "Thumbs.db")
    touch(d / "query", "0001_c1s1_001051_00.jpg", "0003_c4s6_015641_00.jpg")
    touch(d / "bounding_box_test", "0001_c2s1_000301_01.jpg", "-1_c1s1_000401_03.jpg", "0000_c6s1_000001_01.jpg",
          "0003_c5s1_000501_02.jpg", "Thumbs.db")
    return root


def test_market_layout_drops_junk_keeps_distractors_ignores_strays(tmp_path):
    ds = read_dataset("market1501", market_tree(tmp_path))
    assert ds.train["pid"].to_pylist() == [2, 2, 7]
    assert ds.train["camid"].to_pylist() == [0, 1, 2]  # 0-based cameras
    assert ds.query.num_rows == 2
    assert sorted(ds.gallery["pid"].to_pylist()) == [0, 1, 3]  # -1 dropped, 0 kept
    assert set(ds.train.column_names) >= {"path", "pid", "camid", "split", "domain"}
    assert str(ds.train.schema.field("pid").type) == "int64"
    assert all(Path(p).is_file() for p in ds.gallery["path"].to_pylist())
    st = ds.stats()
    assert st["train"] == {"ids": 2, "images": 3, "cameras": 3}
    assert "market1501" in str(ds)


def test_dukemtmc_layout(tmp_path):
    d = tmp_path / "DukeMTMC-reID"
    touch(d / "bounding_box_train", "0001_c2_f0046182.jpg", "0001_c8_f0046999.jpg")
    touch(d / "query", "0005_c1_f0001.jpg")
    touch(d / "bounding_box_test", "0005_c3_f0002.jpg", "0006_c7_f0003.jpg")
    ds = read_dataset("dukemtmc", tmp_path)
    assert ds.train["camid"].to_pylist() == [1, 7]
    assert ds.gallery["pid"].to_pylist() == [5, 6]


def msmt_tree(root: Path, version="V1") -> Path:
    top = root / f"MSMT17_{version}"
    train, test = ("train", "test") if version == "V1" else ("mask_train_v2", "mask_test_v2")
    touch(top / train / "0000", "0000_000_01_0303morning_0015_0.jpg", "0000_001_14_0303morning_0016_0.jpg")
    touch(top / train / "0001", "0001_000_05_0303noon_0001_0.jpg")
    touch(top / test / "0000", "0000_000_03_0303morning_0001_0.jpg", "0000_001_15_0303noon_0002_0.jpg")
    (top / "list_train.txt").write_text("0000/0000_000_01_0303morning_0015_0.jpg 0\n"
                                        "0001/0001_000_05_0303noon_0001_0.jpg 1\n")
    (top / "list_val.txt").write_text("0000/0000_001_14_0303morning_0016_0.jpg 0\n")
    (top / "list_query.txt").write_text("0000/0000_000_03_0303morning_0001_0.jpg 0\n")
    (top / "list_gallery.txt").write_text("0000/0000_001_15_0303noon_0002_0.jpg 0\n")
    return root


@pytest.mark.parametrize("version", ["V1", "V2"])
def test_msmt17_lists_train_plus_val(tmp_path, version):
    ds = read_dataset("msmt17", msmt_tree(tmp_path, version))
    assert ds.train.num_rows == 3  # list_train + list_val
    assert sorted(ds.train["camid"].to_pylist()) == [0, 4, 13]  # third '_' field, 0-based
    assert ds.query["camid"].to_pylist() == [2]
    assert ds.gallery["camid"].to_pylist() == [14]


def test_msmt17_all_trains_on_all_four_lists_with_test_ids_relabelled(tmp_path):
    root = msmt_tree(tmp_path)
    ds = read_dataset("msmt17-all", root, use_cache=False)
    assert ds.train.num_rows == 5  # train + val + query + gallery
    # the test lists number their people from 0 again: shifted past the training ids (0, 1)
    assert sorted(ds.train["pid"].to_pylist()) == [0, 0, 1, 2, 2]
    assert ds.query["pid"].to_pylist() == [2] and ds.gallery["pid"].to_pylist() == [2]
    assert read_dataset("msmt17", root, use_cache=False).train.num_rows == 3  # the plain one is unchanged


def test_msmt17_bad_list_line_names_file_and_line(tmp_path):
    msmt_tree(tmp_path)
    (tmp_path / "MSMT17_V1" / "list_query.txt").write_text("garbage\n")
    with pytest.raises(DatasetError, match=r"list_query.txt:1"):
        read_dataset("msmt17", tmp_path)


@pytest.mark.parametrize("name,variant,box", [("cuhk03np", None, "labeled"), ("cuhk03np", "detected", "detected")])
def test_cuhk03np_variants(tmp_path, name, variant, box):
    for b, pid in (("labeled", 1), ("detected", 2)):
        d = tmp_path / "cuhk03-np" / b
        touch(d / "bounding_box_train", f"{pid:04d}_c1_1.png")
        touch(d / "query", f"{pid:04d}_c2_1.png")
        touch(d / "bounding_box_test", f"{pid:04d}_c1_2.png")
    ds = read_dataset(name, tmp_path, variant=variant)
    assert ds.train["pid"].to_pylist() == [1 if box == "labeled" else 2]
    assert ds.train["path"][0].as_py().endswith(".png")


def test_wrong_root_names_expected_folder_and_contents(tmp_path):
    (tmp_path / "something_else").mkdir()
    with pytest.raises(DatasetError, match=r"Market-1501-v15\.09\.15.*something_else"):
        read_dataset("market1501", tmp_path)


def test_partial_root_names_missing_part(tmp_path):
    touch(tmp_path / "Market-1501-v15.09.15" / "query", "0001_c1s1_001051_00.jpg")
    with pytest.raises(DatasetError, match="missing bounding_box_train, bounding_box_test"):
        read_dataset("market1501", tmp_path)


def test_unknown_dataset_lists_valid_names(tmp_path):
    with pytest.raises(DatasetError, match="valid names: .*market1501"):
        read_dataset("market", tmp_path)


def test_unparseable_image_name_is_an_error(tmp_path):
    market_tree(tmp_path)
    touch(tmp_path / "Market-1501-v15.09.15" / "query", "holiday.jpg")
    with pytest.raises(DatasetError, match="holiday.jpg"):
        read_dataset("market1501", tmp_path)


def test_manifest_cache_is_reused_and_invalidated(tmp_path):
    cache = tmp_path / "c"
    market_tree(tmp_path)
    assert read_dataset("market1501", tmp_path, cache_dir=cache).train.num_rows == 3
    assert len(list((cache / "manifests").glob("*.parquet"))) == 1
    # a cached manifest is served without rescanning ...
    assert read_dataset("market1501", tmp_path, cache_dir=cache).train.num_rows == 3
    # ... until the folder changes
    touch(tmp_path / "Market-1501-v15.09.15" / "bounding_box_train", "0009_c1s1_000001_01.jpg")
    import os
    folder = tmp_path / "Market-1501-v15.09.15" / "bounding_box_train"
    st = folder.stat()
    os.utime(folder, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # coarse-mtime filesystems
    assert read_dataset("market1501", tmp_path, cache_dir=cache).train.num_rows == 4


def test_failed_read_caches_nothing(tmp_path):
    cache = tmp_path / "c"
    market_tree(tmp_path)
    touch(tmp_path / "Market-1501-v15.09.15" / "query", "bad_name.jpg")
    with pytest.raises(DatasetError):
        read_dataset("market1501", tmp_path, cache_dir=cache)
    assert not list(cache.rglob("*.parquet"))
