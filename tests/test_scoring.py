"""The torch-free scoring maths the daemon and training share (moleflow.scoring): frame
normalisation and light standardisation, anomaly maps, position statistics, map values, and the
scoring workers' parallelism."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.mark.parametrize("mean,std", [((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
                                      ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
def test_preprocess_is_the_normalisation_formula(mean, std):
    from moleflow.scoring import preprocess
    images = np.random.default_rng(0).integers(0, 256, (3, 40, 56, 3), dtype=np.uint8)
    expected = ((images.astype(np.float64) / 255.0 - np.asarray(mean)) / np.asarray(std))
    got = preprocess(images, mean, std)
    assert got.dtype == np.float32 and got.shape == (3, 3, 40, 56)
    np.testing.assert_allclose(got, expected.transpose(0, 3, 1, 2), atol=2e-6)
    assert preprocess(images[:0], mean, std).shape == (0, 3, 40, 56)
    with pytest.raises(ValueError, match="uint8"):
        preprocess(images.astype(np.float32), mean, std)


@pytest.mark.parametrize("mean,std", [((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
                                      ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
def test_standardised_input_cancels_gain_exposure_and_contrast(mean, std):
    from moleflow.scoring import LIGHT_MEAN, LIGHT_STD, preprocess

    def grey(blob):  # the standardised frame in units of the grey range (B, pixels)
        x = blob * np.asarray(std)[None, :, None, None] + np.asarray(mean)[None, :, None, None]
        return x.reshape(len(x), -1).astype(np.float64)

    rng = np.random.default_rng(1)
    images = rng.integers(40, 200, (2, 48, 48, 3), dtype=np.uint8)
    images[1, :24] //= 3  # a darker half: frames with their own structure
    base = preprocess(images, mean, std, standardise=True)
    np.testing.assert_allclose(grey(base).mean(axis=1), LIGHT_MEAN, atol=1e-5)
    np.testing.assert_allclose(grey(base).std(axis=1), LIGHT_STD, rtol=1e-5)
    if mean == (0.5, 0.5, 0.5):  # the default backbone's: zero mean, std LIGHT_STD / 0.5
        np.testing.assert_allclose(base.reshape(2, -1).mean(axis=1), 0.0, atol=1e-5)
        np.testing.assert_allclose(base.reshape(2, -1).std(axis=1), LIGHT_STD / 0.5, rtol=1e-5)
    for gain, offset in ((1.1, 0.0), (0.9, 12.0), (1.0, -10.0)):  # all inside 0..255
        changed = np.rint(images * gain + offset).astype(np.uint8)  # no clipping at these
        same = preprocess(changed, mean, std, standardise=True)
        # what remains is the camera's rounding to whole grey levels
        assert np.abs(same - base).max() < 0.02, (gain, offset)
        unstandardised = preprocess(changed, mean, std) - preprocess(images, mean, std)
        assert np.abs(unstandardised).max() > 0.05  # the change the standardisation removes
    blank = preprocess(np.full((1, 8, 8, 3), 77, np.uint8), mean, std, standardise=True)
    # a blank frame becomes blank mid grey (float rounding aside)
    assert np.abs(grey(blank) - LIGHT_MEAN).max() < 1e-5
    noisy = np.full((1, 8, 8, 3), 77, np.uint8)
    noisy[0, 0, 0, 0] = 78  # one grey level of noise is not amplified to full contrast
    assert np.abs(grey(preprocess(noisy, mean, std, standardise=True)) - LIGHT_MEAN).max() < 0.25


@pytest.mark.parametrize("h,w,size,sigma", [(32, 32, 256, 4.0), (28, 20, 224, 2.5),
                                            (16, 16, 64, 0.0)])
def test_anomaly_maps_equal_opencv_resize_and_blur(h, w, size, sigma):
    from moleflow.scoring import anomaly_maps, reference_maps
    grids = (np.random.default_rng(1).normal(size=(3, h, w)) * 30 + 100).astype(np.float32)
    got, ref = anomaly_maps(grids, size, sigma), reference_maps(grids, size, sigma)
    assert got.shape == ref.shape == (3, size, size) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-3)
    grids[1, 3, 5] += 500.0  # a hot patch stays where it is
    peak = np.unravel_index(np.argmax(anomaly_maps(grids, size, sigma)[1]), (size, size))
    assert abs(peak[0] - (3 + 0.5) * size / h) <= size / h and \
        abs(peak[1] - (5 + 0.5) * size / w) <= size / w


def test_position_norm_standardises_per_position_with_a_floored_std():
    from moleflow.scoring import PositionNorm, image_scores
    # position (0, 0) varies a lot over the normal grids, (0, 1) a little, (1, *) not at all
    train = np.array([[[0.0, 10.0], [5.0, 5.0]], [[20.0, 12.0], [5.0, 5.0]],
                      [[40.0, 14.0], [5.0, 5.0]]], dtype=np.float32)
    norm = PositionNorm.fit(train)
    std = np.sqrt(np.array([800.0, 8.0]) / 3)  # population std of (0, 20, 40) and (10, 12, 14)
    np.testing.assert_allclose(norm.mean, [[20.0, 12.0], [5.0, 5.0]])
    floor = 0.1 * np.median([std[0], std[1], 0.0, 0.0])  # constant positions: floored
    np.testing.assert_allclose(norm.std, [[std[0], std[1]], [floor, floor]], rtol=1e-6)
    test = np.array([[[50.0, 12.0], [5.0, 5.0]],    # high raw NLL where normals vary anyway
                     [[20.0, 17.0], [5.0, 5.0]]],   # a smaller NLL where they never do
                    dtype=np.float32)
    z = norm.apply(test)
    np.testing.assert_allclose(z[0, 0], [30.0 / std[0], 0.0], rtol=1e-6)
    np.testing.assert_allclose(image_scores(test, 1, norm), [30.0 / std[0], 5.0 / std[1]],
                               rtol=1e-6)
    assert list(np.argsort(image_scores(test, 1))) == [1, 0]       # raw NLL: image 0 worse
    assert list(np.argsort(image_scores(test, 1, norm))) == [0, 1]  # standardised: image 1
    back = PositionNorm.from_arrays(norm.to_arrays())
    assert np.array_equal(back.mean, norm.mean) and np.array_equal(back.std, norm.std)
    with pytest.raises(ValueError, match="do not match"):
        norm.apply(np.zeros((1, 3, 3), np.float32))
    with pytest.raises(ValueError, match="at least 2 finite"):
        PositionNorm.fit(train[:1])
    with pytest.raises(ValueError, match="positive-std"):
        PositionNorm.from_arrays({"mean": norm.mean, "std": np.zeros((2, 2))}, "x.npz")


def _textured(n: int, seed: int) -> np.ndarray:
    """Frames of one product under one light: a smooth grey texture with small differences."""
    rng = np.random.default_rng(seed)
    base = 128 + 50 * np.sin(np.linspace(0, 6, 48))[:, None, None] * np.ones((48, 48, 3))
    return np.stack([np.clip(base * rng.uniform(0.97, 1.03) + rng.normal(0, 4, base.shape),
                             0, 255).astype(np.uint8) for _ in range(n)])


def test_relit_frame_gets_its_products_light_back():
    """A camera's contrast or gain change beyond what the product's training frames show is
    undone by relighting to their typical light (to a grey level, away from clipping); frames
    in the usual light are not retried."""
    from moleflow.conditions import parse_condition
    from moleflow.scoring import frame_light, light_offsets, light_reference, light_retries, relit
    train = _textured(12, 0)
    ref = light_reference(train)
    m, s = frame_light(train)
    np.testing.assert_allclose(ref[[0, 2]], [m.mean(), s.mean()], rtol=1e-5)
    np.testing.assert_allclose(ref[[1, 3]], np.maximum([m.std(), s.std()], 1 / 255), rtol=1e-4)
    frame = _textured(1, 1)
    for cond in ("contrast:+20", "contrast:-20", "brightness:+15", "brightness:-15"):
        changed = parse_condition(cond).apply(frame)
        cm, cs = frame_light(changed)
        assert light_offsets(cm, cs, ref)[0] > 3, cond
        back = relit(changed[0], float(cm[0]), float(cs[0]), ref)
        bm, bs = frame_light(back[None])
        assert abs(bm[0] - ref[0]) < 1.5 / 255 and abs(bs[0] - ref[2]) < 1.5 / 255, cond
        assert np.abs(back.astype(int) - frame[0].astype(int)).mean() < 2.5, cond
    norms = {"p": type("N", (), {"light": ref})(), "old": type("N", (), {"light": None})()}
    frames = np.concatenate([frame, parse_condition("contrast:+20").apply(frame)] * 2)
    picked, relit_frames, offsets = light_retries(frames, ["p", "p", "old", "old"], norms, 2.0)
    assert picked == [1] and relit_frames.shape == (1, 48, 48, 3)  # old experts: no reference
    assert offsets[0] < 2 < offsets[1] and np.isnan(offsets[2:]).all()
    assert light_retries(frames, ["p"] * 4, norms, 0.0)[0] == []    # 0: off


def test_keep_lower_takes_the_relit_grid_only_where_it_scores_lower():
    from moleflow.scoring import PositionNorm, image_scores, keep_lower
    norm = PositionNorm(np.zeros((2, 2), np.float32), np.ones((2, 2), np.float32))
    grids = np.array([[[5, 0], [0, 0]], [[1, 0], [0, 0]], [[3, 0], [0, 0]]], np.float32)
    again = np.array([[[2, 0], [0, 0]], [[4, 0], [0, 0]]], np.float32)  # for frames 0 and 1
    taken = keep_lower(grids, [0, 1], again, ["p"] * 3, {"p": norm}, 1)
    assert taken.tolist() == [True, False]
    np.testing.assert_array_equal(image_scores(grids, 1, norm), [2, 1, 3])
    back = PositionNorm.from_arrays({**norm.to_arrays(), "light": np.array([0.5, 0.01, 0.2, 0.01])})
    assert back.light is not None and "light" in back.to_arrays()
    with pytest.raises(ValueError, match="light reference"):
        PositionNorm.from_arrays({**norm.to_arrays(), "light": np.array([0.5, 0.0, 0.2, 0.01])})


def test_likelihood_map_values_are_one_minus_the_per_dimension_likelihood():
    from moleflow.scoring import map_values
    nll = np.array([[[-10.0, 0.0], [100.0, 1e6]]], dtype=np.float32)
    lik = map_values(nll, "likelihood", 100)
    np.testing.assert_allclose(lik[0], [[1 - np.exp(0.1), 0.0], [1 - np.exp(-1.0), 1.0]],
                               rtol=1e-6)
    assert lik.dtype == np.float32
    assert np.all(np.diff(map_values(np.sort(nll.ravel())[None, None], "likelihood", 100)) >= 0)
    assert np.isfinite(map_values(np.full((1, 1, 1), -1e9, np.float32), "likelihood", 100)).all()
    assert np.array_equal(map_values(nll, "nll", 100), nll)
    with pytest.raises(ValueError, match="'likelihood' or 'nll'"):
        map_values(nll, "probability", 100)


def test_parallelism_one_single_threaded_worker_per_core(monkeypatch):
    from moleflow.engines import runtime
    monkeypatch.setattr(runtime, "cpu_cores", lambda: 4)
    assert runtime.parallelism("onnxruntime") == (4, 1)
    assert runtime.parallelism("onnxruntime", workers=1) == (1, 4)
    assert runtime.parallelism("onnxruntime", workers=2, threads=3) == (2, 3)
    assert runtime.parallelism("tensorrt", workers=4) == (1, 1)  # one CUDA context
