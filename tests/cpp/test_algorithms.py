"""Every bundled algorithm against a numpy/scipy reference, on hypothesis-generated inputs."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi
import scipy.signal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edgecompute.errors import InvalidRequest
from edgecompute_cpp import CppExecutor

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
FLOATS = {"min_value": -1000, "max_value": 1000, "allow_nan": False, "allow_infinity": False, "width": 32}


def images(dtype: type = np.float32, channels: bool = False, min_side: int = 1,
           max_side: int = 24) -> st.SearchStrategy:
    side = st.integers(min_side, max_side)
    shape = st.tuples(side, side, st.integers(1, 4)) if channels else st.tuples(side, side)
    return hnp.arrays(dtype, shape, elements=st.floats(**FLOATS) if dtype != np.uint8 else st.integers(0, 255))


def scale(x: np.ndarray) -> float:
    return max(1.0, float(np.abs(x).max(initial=0)))


# -- grayscale ----------------------------------------------------------------------------------

@SETTINGS
@given(image=hnp.arrays(np.float32, st.tuples(st.integers(1, 20), st.integers(1, 20), st.sampled_from([3, 4])),
                        elements=st.floats(**FLOATS)), order=st.sampled_from(["rgb", "bgr"]))
def test_grayscale_float_matches_numpy(cpp: CppExecutor, image: np.ndarray, order: str) -> None:
    weights = np.array([0.299, 0.587, 0.114])
    if order == "bgr":
        weights = weights[::-1]
    expected = image[..., :3].astype(np.float64) @ weights
    got = cpp.call("grayscale", image, {"order": order})
    assert got.dtype == np.float32 and got.shape == image.shape[:2]
    np.testing.assert_allclose(got, expected, atol=1e-4 * scale(image), rtol=0)


@SETTINGS
@given(image=hnp.arrays(np.uint8, st.tuples(st.integers(1, 20), st.integers(1, 20), st.just(3))))
def test_grayscale_uint8_rounds_like_numpy(cpp: CppExecutor, image: np.ndarray) -> None:
    expected = np.clip(np.rint(image.astype(np.float64) @ np.array([0.299, 0.587, 0.114])), 0, 255)
    got = cpp.call("grayscale", image)
    assert got.dtype == np.uint8
    assert np.abs(got.astype(int) - expected.astype(int)).max(initial=0) <= 1


@SETTINGS
@given(height=st.integers(1, 3), width=st.integers(1, 120), channels=st.sampled_from([3, 4]),
       dtype=st.sampled_from([np.uint8, np.float32, np.float64]), order=st.sampled_from(["rgb", "bgr"]),
       seed=st.integers(0, 2**32 - 1))
def test_grayscale_every_dtype_and_channel_count(cpp: CppExecutor, height: int, width: int, channels: int,
                                                 dtype: type, order: str, seed: int) -> None:
    """Rows long enough for the vectorised blocks and their scalar tails, all layouts."""
    rng = np.random.default_rng(seed)
    image = (rng.integers(0, 256, (height, width, channels)) if dtype == np.uint8
             else rng.uniform(-1000, 1000, (height, width, channels))).astype(dtype)
    weights = np.array([0.299, 0.587, 0.114])
    if order == "bgr":
        weights = weights[::-1]
    expected = image[..., :3].astype(np.float64) @ weights
    got = cpp.call("grayscale", image, {"order": order})
    assert got.dtype == dtype and got.shape == (height, width)
    if dtype == np.uint8:
        assert np.abs(got.astype(int) - np.clip(np.rint(expected), 0, 255).astype(int)).max(initial=0) <= 1
    else:
        np.testing.assert_allclose(got, expected, atol=1e-4 * scale(image), rtol=0)


@pytest.mark.parametrize("order", ["rgb", "bgr"])
def test_grayscale_full_hd(cpp: CppExecutor, order: str) -> None:
    """Large enough for the streamed (non-temporal) stores of the float RGB path."""
    image = np.random.default_rng(6).random((1080, 1921, 3), dtype=np.float32)
    weights = np.array([0.299, 0.587, 0.114])
    if order == "bgr":
        weights = weights[::-1]
    got = cpp.call("grayscale", image, {"order": order})
    assert got.dtype == np.float32 and got.shape == (1080, 1921)
    assert np.abs(got - image.astype(np.float64) @ weights).max() <= 1e-6


# -- gaussian blur -----------------------------------------------------------------------------

@SETTINGS
@given(image=images(), sigma=st.floats(0.0, 6.0), truncate=st.sampled_from([4.0, 3.0, 2.5]))
def test_gaussian_blur_matches_scipy(cpp: CppExecutor, image: np.ndarray, sigma: float, truncate: float) -> None:
    expected = ndi.gaussian_filter(image.astype(np.float64), sigma, mode="reflect", truncate=truncate)
    got = cpp.call("gaussian_blur", image, {"sigma": sigma, "truncate": truncate})
    assert got.dtype == np.float32 and got.shape == image.shape
    np.testing.assert_allclose(got, expected, atol=1e-4 * scale(image), rtol=0)


@SETTINGS
@given(image=images(np.float64, channels=True), sy=st.floats(0.0, 4.0), sx=st.floats(0.0, 4.0))
def test_gaussian_blur_channels_and_two_sigmas(cpp: CppExecutor, image: np.ndarray, sy: float, sx: float) -> None:
    expected = ndi.gaussian_filter(image, (sy, sx, 0), mode="reflect")
    got = cpp.call("gaussian_blur", image, {"sigma": [sy, sx]})
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, expected, atol=1e-9 * scale(image), rtol=0)


def test_gaussian_blur_full_hd_matches_scipy_to_1e4(cpp: CppExecutor) -> None:
    image = np.random.default_rng(1).random((1080, 1920), dtype=np.float32)
    expected = ndi.gaussian_filter(image, 2.0, mode="reflect")
    got = cpp.call("cpp/gaussian_blur", image, {"sigma": 2.0})
    assert np.abs(got - expected).max() <= 1e-4


# -- sobel --------------------------------------------------------------------------------------

@SETTINGS
@given(image=images(np.float64, min_side=1))
def test_sobel_matches_scipy(cpp: CppExecutor, image: np.ndarray) -> None:
    gx, gy = ndi.sobel(image, axis=1, mode="reflect"), ndi.sobel(image, axis=0, mode="reflect")
    got = cpp.call("sobel", image, {"output": "all"})
    tolerance = 1e-9 * scale(image)
    np.testing.assert_allclose(got["gx"], gx, atol=tolerance, rtol=0)
    np.testing.assert_allclose(got["gy"], gy, atol=tolerance, rtol=0)
    np.testing.assert_allclose(got["magnitude"], np.hypot(gx, gy), atol=tolerance, rtol=0)


@SETTINGS
@given(image=images(np.float32))
def test_sobel_magnitude_float32(cpp: CppExecutor, image: np.ndarray) -> None:
    x = image.astype(np.float64)
    expected = np.hypot(ndi.sobel(x, axis=1), ndi.sobel(x, axis=0))
    got = cpp.call("sobel", image)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=2e-5 * 8 * scale(image), rtol=0)


# -- resize -------------------------------------------------------------------------------------

def reference_resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize with OpenCV's INTER_LINEAR geometry (pixel centres, edges clamped)."""

    def taps(src: int, dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = np.clip((np.arange(dst) + 0.5) * (src / dst) - 0.5, 0, src - 1)
        x0 = np.floor(x).astype(int)
        return x0, np.minimum(x0 + 1, src - 1), x - x0

    y0, y1, fy = taps(image.shape[0], height)
    x0, x1, fx = taps(image.shape[1], width)
    img = image.astype(np.float64)
    if img.ndim == 2:
        img = img[..., None]
    fy, fx = fy[:, None, None], fx[None, :, None]
    rows = img[y0] * (1 - fy) + img[y1] * fy
    out = rows[:, x0] * (1 - fx) + rows[:, x1] * fx
    return out if image.ndim == 3 else out[..., 0]


@SETTINGS
@given(image=st.one_of(images(), images(channels=True)), height=st.integers(1, 50), width=st.integers(1, 50))
def test_resize_matches_bilinear_reference(cpp: CppExecutor, image: np.ndarray, height: int, width: int) -> None:
    got = cpp.call("resize", image, {"width": width, "height": height})
    expected = reference_resize(image, height, width)
    assert got.shape == expected.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-4 * scale(image), rtol=0)


@SETTINGS
@given(image=images(np.uint8, channels=True), height=st.integers(1, 40), width=st.integers(1, 40))
def test_resize_uint8(cpp: CppExecutor, image: np.ndarray, height: int, width: int) -> None:
    got = cpp.call("resize", image, {"width": width, "height": height})
    expected = np.clip(np.rint(reference_resize(image, height, width)), 0, 255)
    assert got.dtype == np.uint8
    assert np.abs(got.astype(int) - expected.astype(int)).max(initial=0) <= 1


def test_resize_agrees_with_scipy_zoom_on_a_2x_upscale(cpp: CppExecutor) -> None:
    image = np.random.default_rng(2).random((37, 53), dtype=np.float32)
    expected = ndi.zoom(image.astype(np.float64), 2, order=1, mode="nearest", grid_mode=True)
    got = cpp.call("resize", image, {"width": 106, "height": 74})
    np.testing.assert_allclose(got, expected, atol=1e-5)


@SETTINGS
@given(height=st.integers(1, 6), width=st.integers(1, 300), channels=st.sampled_from([0, 1, 2, 3, 4]),
       out_height=st.integers(1, 12), out_width=st.integers(1, 300), dtype=st.sampled_from([np.float32, np.uint8]),
       seed=st.integers(0, 2**32 - 1))
def test_resize_long_rows_at_every_scale(cpp: CppExecutor, height: int, width: int, channels: int, out_height: int,
                                         out_width: int, dtype: type, seed: int) -> None:
    """Rows long enough for the vectorised horizontal blocks (2 W and 4 W source elements wide) and
    the scalar ones (strong downscales, row ends), horizontal-first (upscales) and vertical-first
    (downscales), 2-D and (h, w, c) images."""
    rng = np.random.default_rng(seed)
    shape = (height, width) if channels == 0 else (height, width, channels)
    image = (rng.integers(0, 256, shape) if dtype == np.uint8 else rng.uniform(-1000, 1000, shape)).astype(dtype)
    got = cpp.call("resize", image, {"width": out_width, "height": out_height})
    expected = reference_resize(image, out_height, out_width)
    assert got.dtype == dtype and got.shape == expected.shape
    if dtype == np.uint8:
        assert np.abs(got.astype(int) - np.clip(np.rint(expected), 0, 255).astype(int)).max(initial=0) <= 1
    else:
        np.testing.assert_allclose(got, expected, atol=1e-4 * scale(image), rtol=0)


@pytest.mark.parametrize(("shape", "size"), [((1080, 1920), (720, 1280)), ((270, 480, 3), (1080, 1920)),
                                             ((1080, 1920), (270, 480)), ((600, 800, 4), (100, 130)),
                                             ((1, 700), (5, 333)), ((700, 1), (333, 5))])
@pytest.mark.parametrize("dtype", [np.float32, np.uint8])
def test_resize_large_images(cpp: CppExecutor, shape: tuple[int, ...], size: tuple[int, int], dtype: type) -> None:
    rng = np.random.default_rng(sum(shape))
    image = (rng.integers(0, 256, shape) if dtype == np.uint8 else rng.random(shape)).astype(dtype)
    got = cpp.call("resize", image, {"width": size[1], "height": size[0]})
    expected = reference_resize(image, *size)
    assert got.dtype == dtype and got.shape == expected.shape
    if dtype == np.uint8:
        assert np.abs(got.astype(int) - np.clip(np.rint(expected), 0, 255).astype(int)).max(initial=0) <= 1
    else:
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


# -- FIR filter ---------------------------------------------------------------------------------

@SETTINGS
@given(signal=hnp.arrays(np.float64,
                         st.one_of(st.tuples(st.integers(1, 300)), st.tuples(st.integers(1, 3), st.integers(1, 100))),
                         elements=st.floats(**FLOATS)),
       taps=hnp.arrays(np.float64, st.tuples(st.integers(1, 40)), elements=st.floats(-2, 2)))
def test_fir_filter_matches_lfilter(cpp: CppExecutor, signal: np.ndarray, taps: np.ndarray) -> None:
    expected = scipy.signal.lfilter(taps, [1.0], signal, axis=-1)
    got = cpp.call("fir_filter", {"signal": signal, "taps": taps})
    assert got.shape == signal.shape
    np.testing.assert_allclose(got, expected, atol=1e-9 * scale(signal) * taps.size, rtol=0)


@SETTINGS
@given(signal=hnp.arrays(np.float32, st.tuples(st.integers(1, 200)), elements=st.floats(**FLOATS)),
       taps=hnp.arrays(np.float32, st.tuples(st.integers(1, 33)), elements=st.floats(-2, 2, width=32)))
def test_fir_filter_full_mode_matches_convolve(cpp: CppExecutor, signal: np.ndarray, taps: np.ndarray) -> None:
    expected = np.convolve(signal.astype(np.float64), taps.astype(np.float64))
    got = cpp.call("fir_filter", [signal, taps], {"mode": "full"})
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-5 * scale(signal) * taps.size, rtol=0)


@SETTINGS
@given(rows=st.sampled_from([None, 1, 2, 3]), n=st.integers(0, 3000), k=st.integers(1, 200),
       dtype=st.sampled_from([np.float32, np.float64]), mode=st.sampled_from(["causal", "full"]),
       seed=st.integers(0, 2**32 - 1))
def test_fir_filter_long_signals(cpp: CppExecutor, rows: int | None, n: int, k: int, dtype: type, mode: str,
                                 seed: int) -> None:
    """Signals long enough for whole register blocks inside the signal, beside the blocks at both
    ends that run off it (and the partial last one), in both modes and dtypes."""
    rng = np.random.default_rng(seed)
    signal = rng.uniform(-1000, 1000, (n,) if rows is None else (rows, n)).astype(dtype)
    taps = rng.uniform(-2, 2, k).astype(dtype)
    full = np.apply_along_axis(lambda row: np.convolve(row, taps.astype(np.float64)), -1,
                               signal.astype(np.float64)) if n else np.zeros(signal.shape)
    expected = full if mode == "full" else full[..., :n]
    got = cpp.call("fir_filter", {"signal": signal, "taps": taps}, {"mode": mode})
    assert got.dtype == dtype and got.shape == expected.shape
    eps = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(got, expected, atol=eps * scale(signal) * k, rtol=0)


@pytest.mark.parametrize(("n", "k"), [(1, 5000), (50, 20000), (3000, 2999), (129, 128), (1000, 1000)])
@pytest.mark.parametrize("mode", ["causal", "full"])
def test_fir_filter_taps_as_long_as_or_longer_than_the_signal(cpp: CppExecutor, n: int, k: int, mode: str) -> None:
    rng = np.random.default_rng(n + k)
    signal, taps = rng.standard_normal(n), rng.standard_normal(k)
    full = np.convolve(signal, taps)
    got = cpp.call("fir_filter", {"signal": signal, "taps": taps}, {"mode": mode})
    np.testing.assert_allclose(got, full if mode == "full" else full[:n], atol=1e-10 * np.sqrt(k), rtol=0)


def test_fir_filter_a_million_samples(cpp: CppExecutor) -> None:
    rng = np.random.default_rng(5)
    signal = rng.standard_normal(1 << 20).astype(np.float32)
    taps = scipy.signal.firwin(63, 0.2).astype(np.float32)
    expected = scipy.signal.lfilter(taps.astype(np.float64), [1.0], signal.astype(np.float64))
    got = cpp.call("fir_filter", {"signal": signal, "taps": taps})
    assert np.abs(got - expected).max() <= 1e-5


# -- FFT ----------------------------------------------------------------------------------------

@SETTINGS
@given(signal=st.one_of(
    hnp.arrays(np.float64, st.tuples(st.integers(1, 300)), elements=st.floats(**FLOATS)),
    hnp.arrays(np.complex128, st.tuples(st.integers(1, 4), st.integers(1, 130)),
               elements=st.complex_numbers(max_magnitude=1000, allow_nan=False, allow_infinity=False)),
), inverse=st.booleans())
def test_fft_matches_numpy(cpp: CppExecutor, signal: np.ndarray, inverse: bool) -> None:
    expected = (np.fft.ifft if inverse else np.fft.fft)(signal, axis=-1)
    got = cpp.call("fft", signal, {"inverse": inverse})
    assert got.dtype == np.complex128 and got.shape == signal.shape
    n = max(signal.shape[-1], 1)
    np.testing.assert_allclose(got, expected, atol=1e-10 * scale(signal) * n, rtol=0)


def test_empty_signals_give_empty_outputs(cpp: CppExecutor) -> None:
    assert cpp.call("fft", np.zeros(0)).shape == (0,)
    assert cpp.call("fir_filter", [np.zeros(0), np.ones(3)]).shape == (0,)
    assert cpp.call("fir_filter", [np.zeros((2, 0)), np.ones(3)], {"mode": "full"}).shape == (2, 0)
    assert cpp.call("gaussian_blur", np.zeros((0, 5), np.float32)).shape == (0, 5)


FFT_DTYPES = [np.float32, np.float64, np.complex64, np.complex128]


def relative_error(got: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(got - expected).max(initial=0) / max(1e-300, np.abs(expected).max(initial=0)))


def fft_signal(rng: np.random.Generator, shape: tuple[int, ...], dtype: type) -> np.ndarray:
    signal = rng.standard_normal(shape)
    if np.dtype(dtype).kind == "c":
        signal = signal + 1j * rng.standard_normal(shape)
    return signal.astype(dtype)


def check_fft(cpp: CppExecutor, signal: np.ndarray, inverse: bool) -> None:
    """Against numpy in double precision: ~1e-15 relative to the spectrum for 64-bit inputs."""
    single = signal.dtype in (np.float32, np.complex64)
    expected = (np.fft.ifft if inverse else np.fft.fft)(signal.astype(np.complex128), axis=-1)
    got = cpp.call("fft", signal, {"inverse": inverse})
    assert got.dtype == (np.complex64 if single else np.complex128) and got.shape == signal.shape
    assert relative_error(got, expected) <= (1e-6 if single else 1e-13)


# every butterfly (8, 4, 2, 5, 3 and the generic odd one for 7, 11, 13, ... 61) and Bluestein (a
# prime factor above 61), real (packed two samples a point, or two odd rows a transform) and
# complex, rows, both directions
@SETTINGS
@given(factors=st.lists(st.sampled_from([2, 3, 4, 5, 7, 8, 11, 13, 61, 67, 101]), min_size=0, max_size=6),
       rows=st.sampled_from([None, 1, 2, 3]), dtype=st.sampled_from(FFT_DTYPES), inverse=st.booleans(),
       seed=st.integers(0, 2**32 - 1))
def test_fft_mixed_radix_lengths(cpp: CppExecutor, factors: list[int], rows: int | None, dtype: type,
                                 inverse: bool, seed: int) -> None:
    n = int(np.prod(factors, dtype=np.int64))
    if n > 40000:
        n = 40000 + sum(factors)
    shape = (n,) if rows is None else (rows, n)
    check_fft(cpp, fft_signal(np.random.default_rng(seed), shape, dtype), inverse)


@pytest.mark.parametrize("n", [7, 11, 13, 49, 61, 67, 1000, 1001, 4096, 4096 * 3, 10007, 2 * 10007, 3 * 5 * 7 * 11 * 13,
                               65536 + 2, 2**17 * 3])
@pytest.mark.parametrize("dtype", FFT_DTYPES)
def test_fft_named_lengths(cpp: CppExecutor, n: int, dtype: type) -> None:
    rng = np.random.default_rng(n)
    for inverse in (False, True):
        check_fft(cpp, fft_signal(rng, (n,), dtype), inverse)
    check_fft(cpp, fft_signal(rng, (3, min(n, 5000)), dtype), False)


def test_fft_two_to_the_twenty(cpp: CppExecutor) -> None:
    rng = np.random.default_rng(20)
    check_fft(cpp, fft_signal(rng, (1 << 20,), np.float64), False)
    check_fft(cpp, fft_signal(rng, (1 << 20,), np.complex128), True)


def test_fft_four_step_lengths(cpp: CppExecutor) -> None:
    """Above 2^20 points a transform is split n = n1 n2 (here 1400 x 750 and, inside Bluestein for
    the prime 600011, 1350 x 900: batches of 8 columns with partial last ones)."""
    rng = np.random.default_rng(21)
    for inverse in (False, True):
        check_fft(cpp, fft_signal(rng, (1050000,), np.complex128), inverse)
    check_fft(cpp, fft_signal(rng, (600011,), np.complex64), False)


@SETTINGS
@given(n=st.integers(1, 3000), rows=st.integers(1, 3), real=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_fft_inverse_round_trip(cpp: CppExecutor, n: int, rows: int, real: bool, seed: int) -> None:
    signal = fft_signal(np.random.default_rng(seed), (rows, n), np.float64 if real else np.complex128)
    back = cpp.call("fft", cpp.call("fft", signal), {"inverse": True})
    assert relative_error(back, signal.astype(np.complex128)) <= 1e-13


@pytest.mark.parametrize("n", [1, 2, 1024, 1000, 4097, 65536])
def test_fft_lengths_float32(cpp: CppExecutor, n: int) -> None:
    signal = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    got = cpp.call("fft", signal)
    assert got.dtype == np.complex64
    expected = np.fft.fft(signal.astype(np.float64))
    assert np.abs(got - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max())


# -- matmul -------------------------------------------------------------------------------------

@SETTINGS
@given(m=st.integers(0, 40), k=st.integers(0, 300), n=st.integers(0, 40),
       dtype=st.sampled_from([np.float32, np.float64]),
       seed=st.integers(0, 2**32 - 1))
def test_matmul_matches_numpy(cpp: CppExecutor, m: int, k: int, n: int, dtype: type, seed: int) -> None:
    rng = np.random.default_rng(seed)
    a = rng.uniform(-10, 10, (m, k)).astype(dtype)
    b = rng.uniform(-10, 10, (k, n)).astype(dtype)
    expected = a.astype(np.float64) @ b.astype(np.float64)
    got = cpp.call("matmul", {"a": a, "b": b})
    assert got.dtype == dtype and got.shape == (m, n)
    eps = 1e-6 if dtype == np.float32 else 1e-14
    np.testing.assert_allclose(got, expected, atol=eps * 100 * max(k, 1), rtol=0)


def test_matmul_larger_than_its_blocks(cpp: CppExecutor) -> None:
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((130, 700)), rng.standard_normal((700, 600))
    np.testing.assert_allclose(cpp.call("matmul", [a, b]), a @ b, atol=1e-10)


@given(x=hnp.arrays(st.sampled_from([np.float32, np.float64, np.int32, np.int64, np.uint8]),
                    hnp.array_shapes(min_dims=0, max_dims=4, max_side=5)))
@SETTINGS
def test_sum(cpp: CppExecutor, x: np.ndarray) -> None:
    with np.errstate(over="ignore", invalid="ignore"):  # inf or nan sums are skipped below
        expected = float(x.astype(np.float64).sum())
    if not np.isfinite(expected):
        return
    got = cpp.call("sum", x)
    assert got.shape == () and got.dtype == np.float64
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-6 * scale(x.astype(np.float64)) * max(x.size, 1))


# -- invalid inputs name the problem -------------------------------------------------------------

@pytest.mark.parametrize(("algorithm", "inputs", "params", "match"), [
    ("gaussian_blur", np.zeros((4, 4), np.uint8), {}, "must have dtype float32, float64, not uint8"),
    ("gaussian_blur", np.zeros((4,), np.float32), {}, "must have 2-3 dimensions, got shape \\(4,\\)"),
    ("gaussian_blur", np.zeros((4, 4), np.float32), {"sigma": "big"}, "param 'sigma' must be a number"),
    ("gaussian_blur", np.zeros((4, 4), np.float32), {"sigma": -1}, "sigma"),
    ("resize", np.zeros((4, 4), np.float32), {"width": 3}, "needs params 'width' and 'height'"),
    ("matmul", {"a": np.zeros((2, 3)), "b": np.zeros((4, 2))}, {}, r"shapes do not match: \(2, 3\) @ \(4, 2\)"),
    ("matmul", {"a": np.zeros((2, 3))}, {}, "missing input 'b'"),
    ("fir_filter", {"signal": np.zeros(4), "taps": np.zeros(0)}, {}, "'taps' is empty"),
    ("grayscale", np.zeros((4, 4, 2), np.uint8), {}, r"shape \(height, width, 3 or 4\)"),
    ("sobel", np.zeros((4, 4)), {"output": "sideways"}, "param 'output'"),
    ("sum", np.array(["a", "b"]), {}, "dtype <U1, which C\\+\\+ plugins cannot take"),
    ("sum", np.zeros(3), {"x": object()}, "unknown param 'x'; sum takes: none"),
    ("nope", np.zeros(3), {}, "cpp has no algorithm 'nope'"),
])
def test_invalid_inputs_raise_invalid_request(cpp: CppExecutor, algorithm: str, inputs: object, params: dict,
                                              match: str) -> None:
    with pytest.raises(InvalidRequest, match=match):
        cpp.call(algorithm, inputs, params)


def test_non_contiguous_and_foreign_inputs_are_accepted(cpp: CppExecutor) -> None:
    image = np.random.default_rng(4).random((40, 60)).astype(np.float32)
    view = image[::2, ::3]
    np.testing.assert_allclose(cpp.call("gaussian_blur", view, {"sigma": 1}),
                               ndi.gaussian_filter(view, 1.0), atol=1e-5)
    big_endian = image.astype(">f4")
    np.testing.assert_allclose(cpp.call("gaussian_blur", big_endian, {"sigma": 1}),
                               ndi.gaussian_filter(image, 1.0), atol=1e-5)
    assert cpp.call("sum", [[1.0, 2.0], [3.0, 4.0]]) == 10.0
