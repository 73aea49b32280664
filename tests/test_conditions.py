"""Camera conditions (robustness benchmark, calibration codec) and training views."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from moleflow.conditions import (DEFAULT_CONDITIONS, Augmentation, ConditionError, apply_to_masks,
                                jpeg, parse_condition)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """Smooth RGB images with structure (a disc and a gradient), like a part on a table."""
    yy, xx = np.mgrid[0:64, 0:64]
    out = []
    for k in range(3):
        img = np.stack([xx * 3, yy * 3, (xx + yy) * 2], axis=-1).astype(np.float32) + 20 * k
        img[(yy - 32) ** 2 + (xx - 30 - k) ** 2 < 150] = (200, 60, 90)
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return np.stack(out)


def test_every_default_condition_parses_and_names_itself():
    for text in DEFAULT_CONDITIONS:
        cond = parse_condition(text)
        assert cond.name == text
        assert parse_condition(cond.name) == cond
    assert parse_condition("raw").kind == "lossless"
    assert parse_condition(" JPEG:85 ").name == "jpeg:85"


@pytest.mark.parametrize("text, match", [
    ("jpeg", "is not one of"), ("lossless:3", "is not one of"), ("gamma:2", "is not one of"),
    ("jpeg:abc", "not a number"), ("jpeg:101", "1..100"), ("jpeg:90.5", "integer"),
    ("rotate:nan", "-45..45"), ("shift:1000", "-64..64")])
def test_bad_conditions_are_named(text, match):
    with pytest.raises(ConditionError, match=match):
        parse_condition(text)


def test_lossless_is_identity_and_jpeg_is_opencvs_codec(images):
    assert np.array_equal(parse_condition("lossless").apply(images), images)
    out = parse_condition("jpeg:85").apply(images)
    bgr = cv2.cvtColor(images[1], cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 85])
    assert np.array_equal(out[1], cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR),
                                               cv2.COLOR_BGR2RGB))
    # lower quality, larger error; a single image (H, W, 3) works too
    err = {q: np.abs(jpeg(images[0], q).astype(int) - images[0]).mean() for q in (95, 75)}
    assert 0 < err[95] < err[75]
    assert parse_condition("jpeg:75").apply(images[0]).shape == images[0].shape


def test_photometric_conditions(images):
    brighter = parse_condition("brightness:+10").apply(images).astype(int)
    assert np.all(brighter >= images) and np.abs(brighter - np.minimum(
        np.rint(images * 1.1), 255)).max() <= 1
    flat = parse_condition("contrast:-10").apply(images).astype(np.float64)
    assert flat.std() < images.astype(np.float64).std()
    n1, n2 = (parse_condition("noise:3").apply(images, seed=5) for _ in range(2))
    assert np.array_equal(n1, n2)  # seeded
    assert 1.5 < np.abs(n1.astype(int) - images).mean() < 3.5
    blurred = parse_condition("blur:1").apply(images)
    assert np.abs(np.diff(blurred.astype(int), axis=2)).mean() < \
        np.abs(np.diff(images.astype(int), axis=2)).mean()


def test_geometric_conditions_move_image_and_masks_together(images):
    shifted = parse_condition("shift:4").apply(images)
    assert np.array_equal(shifted[:, 4:, 4:], images[:, :-4, :-4])
    assert np.array_equal(parse_condition("rotate:0").apply(images), images)
    masks = np.zeros((2, 64, 64), bool)
    masks[:, 10:20, 30:40] = True
    moved = apply_to_masks(parse_condition("shift:4"), masks)
    assert moved.dtype == bool and np.array_equal(moved[:, 14:24, 34:44], masks[:, 10:20, 30:40])
    assert moved.sum() == masks.sum()
    turned = apply_to_masks(parse_condition("rotate:3"), masks)
    assert 0.8 * masks.sum() < turned.sum() < 1.2 * masks.sum() and not np.array_equal(turned,
                                                                                        masks)
    assert apply_to_masks(parse_condition("jpeg:75"), masks) is masks


def test_augmented_views_are_reproducible_per_image_and_view(images):
    aug = Augmentation()
    v1 = aug.views(images, 1, seed=0)
    assert np.array_equal(v1, aug.views(images, 1, seed=0))
    # image i's view does not depend on how many images are drawn with it
    assert np.array_equal(aug.views(images[:2], 1, seed=0), v1[:2])
    assert not np.array_equal(v1, aug.views(images, 2, seed=0))
    assert not np.array_equal(v1, aug.views(images, 1, seed=1))
    diff = np.abs(v1.astype(int) - images).mean()
    assert 0 < diff < 40  # a camera's change, not a different picture
    off = Augmentation(jpeg_share=0.0, photometric=0.0, noise=0.0, blur=0.0, shift=0.0,
                       rotate=0.0)
    assert np.array_equal(off.views(images, 3, seed=0), images)
    assert aug.spec != off.spec
    gains = aug.input_gains(3, 1, seed=0)
    assert np.array_equal(gains[:2], aug.input_gains(2, 1, seed=0))
    assert np.all(np.abs(gains - 1) <= aug.photometric) and len(set(gains.tolist())) == 3
    assert not np.array_equal(gains, aug.input_gains(3, 2, seed=0))
    assert np.array_equal(off.input_gains(3, 1, seed=0), np.ones(3, np.float32))


def test_demo_camera_sends_what_imagezmq_sends_and_the_daemon_decodes_it(images):
    """send_jpg's message (header without shape, then the JPEG) decodes on the daemon side to
    exactly the frame the calibration codec and the benchmark's jpeg:Q condition produce;
    send_image's raw message decodes to the frame itself."""
    import json

    from moleflow.devtools.demo import camera_message
    from moleflow.errors import MoleflowError
    from moleflow.edge.frames import decode
    bgr = cv2.cvtColor(images[0], cv2.COLOR_RGB2BGR)
    parts = camera_message(bgr, "cam|7", "jpeg:90")
    assert set(json.loads(parts[0])) == {"msg"} and parts[1][:2] == b"\xff\xd8"
    frame = decode(parts, 64, 1 << 20, 4096)
    assert np.array_equal(frame.image, parse_condition("jpeg:90").apply(images[0]))
    raw = decode(camera_message(bgr, "cam|8", "raw"), 64, 1 << 20, 4096)
    assert np.array_equal(raw.image, images[0])
    with pytest.raises(MoleflowError, match="camera codec 'jpeg:0'"):
        camera_message(bgr, "cam|9", "jpeg:0")
