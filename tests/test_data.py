"""Behaviour of moleflow.data (finding/reading MVTec-layout data) and moleflow.train.synthetic."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from moleflow.data import (
    IMAGE_EXTENSIONS,
    ClassData,
    DataError,
    TestItem,
    list_classes,
    load_class,
    load_images,
    read_image,
    read_mask,
)
from moleflow.train.synthetic import DEFECTS, class_colours, make_synthetic_mvtec


@pytest.fixture
def small_root(tmp_path: Path) -> Path:
    """A tiny mutable data set (one class 'a') for tests that break things."""
    return make_synthetic_mvtec(tmp_path / "data", classes=("a",), n_train=3, n_test_good=2,
                                n_test_bad=2, size=32)


def _imwrite(path: Path, img: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), img)
    return path


# --- listing and loading -------------------------------------------------------------------


def test_list_and_load_synthetic(synthetic_root: Path) -> None:
    assert list_classes(synthetic_root) == ["alpha", "beta", "gamma"]
    cd = load_class(synthetic_root, "beta")
    assert isinstance(cd, ClassData)
    assert cd.name == "beta" and cd.root == synthetic_root / "beta"
    assert [p.name for p in cd.train] == [f"{i:03d}.png" for i in range(24)]
    good = [t for t in cd.test if t.label == 0]
    bad = [t for t in cd.test if t.label == 1]
    assert len(good) == 6 and all(t.defect == "good" and t.mask_path is None for t in good)
    assert len(bad) == 6 and {t.defect for t in bad} == set(DEFECTS)
    for t in bad:
        assert isinstance(t, TestItem)
        assert t.mask_path == synthetic_root / "beta" / "ground_truth" / t.defect / f"{t.path.stem}_mask.png"
    x = load_images(cd.train[:4], 48)
    assert x.shape == (4, 48, 48, 3) and x.dtype == np.uint8
    assert load_images([], 16).shape == (0, 16, 16, 3)


def test_list_classes_ignores_non_class_folders(tmp_path: Path) -> None:
    (tmp_path / "zeta" / "train" / "good").mkdir(parents=True)
    (tmp_path / "notes").mkdir()
    (tmp_path / ".hidden" / "train" / "good").mkdir(parents=True)
    (tmp_path / "readme.txt").write_text("x")
    assert list_classes(tmp_path) == ["zeta"]


def test_hidden_and_non_image_files_ignored(small_root: Path) -> None:
    good = small_root / "a" / "train" / "good"
    (good / ".DS_Store").write_bytes(b"junk")
    (good / "._000.png").write_bytes(b"junk")
    (good / "Thumbs.db").write_bytes(b"junk")
    (good / "notes.txt").write_text("x")
    _imwrite(good / "upper.JPG", np.zeros((8, 8, 3), np.uint8))
    names = [p.name for p in load_class(small_root, "a").train]
    assert names == ["000.png", "001.png", "002.png", "upper.JPG"]
    assert ".JPG".lower() in IMAGE_EXTENSIONS


def test_need_test_false_allows_missing_test(small_root: Path) -> None:
    import shutil

    shutil.rmtree(small_root / "a" / "test")
    with pytest.raises(DataError, match="test"):
        load_class(small_root, "a")
    cd = load_class(small_root, "a", need_test=False)
    assert cd.test == () and len(cd.train) == 3


# --- errors name the path ------------------------------------------------------------------


def test_missing_root(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    for call in (lambda: list_classes(missing), lambda: load_class(missing, "a")):
        with pytest.raises(DataError) as exc:
            call()
        assert str(missing) in str(exc.value)
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(DataError, match="not a folder"):
        list_classes(f)


def test_missing_class_lists_existing(synthetic_root: Path) -> None:
    with pytest.raises(DataError) as exc:
        load_class(synthetic_root, "delta")
    msg = str(exc.value)
    assert str(synthetic_root / "delta") in msg
    assert all(name in msg for name in ("alpha", "beta", "gamma"))


def test_missing_and_empty_train_good(small_root: Path) -> None:
    good = small_root / "a" / "train" / "good"
    for p in good.iterdir():
        p.unlink()
    (good / "notes.txt").write_text("not an image")
    with pytest.raises(DataError) as exc:
        load_class(small_root, "a")
    assert str(good) in str(exc.value) and "no image" in str(exc.value)
    (good / "notes.txt").unlink()
    good.rmdir()
    with pytest.raises(DataError) as exc:
        load_class(small_root, "a")
    assert str(good) in str(exc.value)


def test_empty_test_folder(small_root: Path) -> None:
    import shutil

    test_dir = small_root / "a" / "test"
    shutil.rmtree(test_dir)
    (test_dir / "good").mkdir(parents=True)
    with pytest.raises(DataError) as exc:
        load_class(small_root, "a")
    assert str(test_dir) in str(exc.value)


def test_missing_mask_names_image_and_expected_mask(small_root: Path) -> None:
    mask = small_root / "a" / "ground_truth" / "scratch" / "000_mask.png"
    mask.unlink()
    with pytest.raises(DataError) as exc:
        load_class(small_root, "a")
    msg = str(exc.value)
    assert str(small_root / "a" / "test" / "scratch" / "000.png") in msg
    assert str(mask) in msg


def test_mask_with_other_extension_is_found(small_root: Path) -> None:
    gt = small_root / "a" / "ground_truth" / "blob"
    m = cv2.imread(str(gt / "000_mask.png"), cv2.IMREAD_UNCHANGED)
    (gt / "000_mask.png").unlink()
    _imwrite(gt / "000_mask.BMP", m)
    item = next(t for t in load_class(small_root, "a").test if t.defect == "blob")
    assert item.mask_path == gt / "000_mask.BMP"
    assert read_mask(item.mask_path, item.path, 32).any()


def test_mask_of_other_size(tmp_path: Path) -> None:
    img = _imwrite(tmp_path / "img.png", np.zeros((20, 30, 3), np.uint8))
    mask = _imwrite(tmp_path / "img_mask.png", np.zeros((20, 20), np.uint8))
    with pytest.raises(DataError) as exc:
        read_mask(mask, img, 16)
    msg = str(exc.value)
    assert str(mask) in msg and str(img) in msg and "20x20" in msg and "30x20" in msg


def test_corrupt_image_names_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    with pytest.raises(DataError) as exc:
        read_image(bad, 16)
    assert str(bad) in str(exc.value) and "corrupt or not an image" in str(exc.value)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="empty.png"):
        read_image(empty, 16)
    with pytest.raises(DataError, match="missing.png"):
        read_image(tmp_path / "missing.png", 16)
    with pytest.raises(DataError, match="broken.png"):
        read_mask(bad, bad, 16)


# --- reading pixels ------------------------------------------------------------------------


def test_greyscale_image_works(tmp_path: Path) -> None:
    grey = np.tile(np.arange(40, dtype=np.uint8) * 6, (30, 1))
    p = _imwrite(tmp_path / "grey.png", grey)
    out = read_image(p, 24)
    assert out.shape == (24, 24, 3) and out.dtype == np.uint8
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    assert out[..., 0].std() > 10


def test_grey_16bit_and_rgba_and_bgr_order(tmp_path: Path) -> None:
    g16 = _imwrite(tmp_path / "g16.png", np.full((10, 10), 65535, np.uint16))
    assert (read_image(g16, 10) == 255).all()
    bgra = np.zeros((10, 10, 4), np.uint8)
    bgra[..., 2] = 200  # red in BGR order
    bgra[..., 3] = 0  # fully transparent: alpha is dropped, colour kept
    out = read_image(_imwrite(tmp_path / "rgba.png", bgra), 10)
    assert out.shape == (10, 10, 3)
    assert (out[..., 0] == 200).all() and (out[..., 1:] == 0).all()
    bgr = np.zeros((10, 10, 3), np.uint8)
    bgr[..., 0] = 255  # blue in BGR
    assert (read_image(_imwrite(tmp_path / "blue.png", bgr), 10)[..., 2] == 255).all()


def test_resize_shrink_enlarge_noop(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    p = _imwrite(tmp_path / "r.png", img)
    assert read_image(p, 20).shape == (20, 20, 3)
    assert read_image(p, 100).shape == (100, 100, 3)
    sq = _imwrite(tmp_path / "sq.png", img[:40, :40])
    assert np.array_equal(read_image(sq, 40), cv2.cvtColor(img[:40, :40], cv2.COLOR_BGR2RGB))


def test_read_mask_binarises_and_resizes(tmp_path: Path) -> None:
    img = _imwrite(tmp_path / "i.png", np.zeros((8, 8, 3), np.uint8))
    m = np.zeros((8, 8, 3), np.uint8)
    m[2:4, 2:4] = (0, 0, 255)  # a pure red (BGR) annotation counts as defect
    m[5, 5] = 100  # dim pixel: below threshold
    mask = read_mask(_imwrite(tmp_path / "m.png", m), img, 16)
    assert mask.dtype == bool and mask.shape == (16, 16)
    assert mask.sum() == 16 and mask[4:8, 4:8].all()
    assert read_mask(tmp_path / "m.png", img, 8, image_shape=(8, 8)).sum() == 4


# --- fingerprint ---------------------------------------------------------------------------


def test_fingerprint_stable_and_sensitive(small_root: Path) -> None:
    fp = load_class(small_root, "a").fingerprint()
    assert len(fp) == 64 and fp == load_class(small_root, "a").fingerprint()
    target = small_root / "a" / "train" / "good" / "001.png"
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    fp_touched = load_class(small_root, "a").fingerprint()
    assert fp_touched != fp
    _imwrite(small_root / "a" / "test" / "good" / "zzz.png", np.zeros((32, 32, 3), np.uint8))
    fp_added = load_class(small_root, "a").fingerprint()
    assert fp_added not in (fp, fp_touched)
    mask = small_root / "a" / "ground_truth" / "blob" / "000_mask.png"
    st = mask.stat()
    os.utime(mask, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert load_class(small_root, "a").fingerprint() != fp_added


# --- synthetic data ------------------------------------------------------------------------


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def test_synthetic_deterministic(tmp_path: Path) -> None:
    kw = dict(classes=("x", "y"), n_train=2, n_test_good=1, n_test_bad=2, size=32)
    a = _tree(make_synthetic_mvtec(tmp_path / "a", seed=3, **kw))
    b = _tree(make_synthetic_mvtec(tmp_path / "b", seed=3, **kw))
    c = _tree(make_synthetic_mvtec(tmp_path / "c", seed=4, **kw))
    assert a == b and a.keys() == c.keys() and a != c
    assert "x/ground_truth/blob/000_mask.png" in a and "y/test/scratch/000.png" in a


def test_synthetic_masks_match_painted_defects(synthetic_root: Path) -> None:
    for index, name in enumerate(list_classes(synthetic_root)):
        _, defect_rgb = class_colours(index)
        for item in load_class(synthetic_root, name).test:
            img = read_image(item.path, 64).astype(int)
            near_defect = np.abs(img - defect_rgb).max(axis=2) < 40
            if item.label == 0:
                assert not near_defect.any()
                continue
            mask = read_mask(item.mask_path, item.path, 64)
            assert mask.sum() >= 10
            assert np.array_equal(mask, near_defect), item.path


def test_synthetic_classes_differ(synthetic_root: Path) -> None:
    means = [load_images(load_class(synthetic_root, c).train, 64).reshape(-1, 3).mean(axis=0)
             for c in list_classes(synthetic_root)]
    for i in range(len(means)):
        for j in range(i + 1, len(means)):
            assert np.abs(means[i] - means[j]).max() > 40


# --- the real data -------------------------------------------------------------------------


def test_real_bottle(shared_data: Path) -> None:
    assert {"bottle", "capsule", "transistor"} <= set(list_classes(shared_data))
    cd = load_class(shared_data, "bottle")
    assert len(cd.train) == 209
    bad = [t for t in cd.test if t.label == 1]
    assert len(bad) == 63 and all(t.mask_path is not None and t.mask_path.is_file() for t in bad)
    assert len(cd.test) - len(bad) == 20
    item = bad[0]
    mask = read_mask(item.mask_path, item.path, 64)
    assert mask.any() and not mask.all()
    assert read_image(item.path, 64).shape == (64, 64, 3)
