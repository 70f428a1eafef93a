"""The cpp executor's trust boundary: a request may not crash the host, allocate what the operator
did not allow, or be silently misread (issue 15, cpp rows)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgecompute import Config, Registry, Request, Resources, Scheduler
from edgecompute.errors import ConfigError, InvalidRequest
from edgecompute_cpp import CppExecutor

_MiB = 1 << 20


@pytest.fixture(scope="module")
def cpp() -> CppExecutor:
    executor = CppExecutor(builtin=True, plugins=[])
    executor.algorithms()
    return executor


def _run_child(code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter: a request that crashed the old code ends only the child."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=600, check=False)


# -- the host-crashing cases -------------------------------------------------------------------------

def test_resize_to_a_row_of_more_than_2_31_elements_is_refused_before_allocating() -> None:
    # 4096 channels x 2^20 columns: an output row of 2^32 float32 elements (16 GiB), from a 16 KiB
    # request; the old code allocated it and its 32-bit element indices wrapped: SIGSEGV.
    result = _run_child("""
        import numpy as np
        from edgecompute.errors import InvalidRequest
        from edgecompute_cpp import CppExecutor
        try:
            CppExecutor().call("resize", np.ones((1, 1, 4096), np.float32), {"width": 1 << 20, "height": 1})
        except InvalidRequest as exc:
            print("refused:", exc)
    """)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "refused:" in result.stdout and "max_output_bytes" in result.stdout


def test_resize_reads_a_row_of_more_than_2_31_elements_with_64_bit_indices() -> None:
    # The plugin itself, below the executor's limits (which refuse such inputs by default): a
    # float32 row of 2^31 + 2^28 elements. The array is calloc'd and only the pages the samples
    # lie in are written, so it needs a few MB of real memory (9.6 GB of address space).
    result = _run_child("""
        import numpy as np
        from edgecompute_cpp import CppExecutor
        w, ow = (1 << 31) + (1 << 28), 8
        image = np.zeros((1, w), np.float32)
        x = np.clip((np.arange(ow) + 0.5) * (w / ow) - 0.5, 0, w - 1)
        x0 = np.floor(x).astype(np.int64)
        x1 = np.minimum(x0 + 1, w - 1)
        image[0, x0] = np.arange(ow, dtype=np.float32) + 1
        image[0, x1] = 100 * (np.arange(ow, dtype=np.float32) + 1)
        f = (x - x0).astype(np.float32)
        a, b = image[0, x0], image[0, x1]
        expected = a + f * (b - a)
        native = CppExecutor()._ensure().plugins["builtin"].native
        [(_, got)] = native.call("resize", [(None, image)], b'{"width":8,"height":1}')
        assert x0.max() > 2**31, x0.max()
        np.testing.assert_allclose(got[0], expected, rtol=1e-6)
        print("ok")
    """)
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert "ok" in result.stdout


# -- memory: outputs are bounded before allocating, and reserved ------------------------------------

def test_resize_of_a_tiny_image_to_a_huge_one_is_refused_before_allocating(cpp: CppExecutor) -> None:
    image = np.zeros((1, 1), np.uint8)  # 1 byte in, 400 MB out
    with pytest.raises(InvalidRequest, match=r"max_output_bytes.*at most") as info:
        cpp.call("resize", image, {"width": 20000, "height": 20000})
    assert "400,000,000" in str(info.value) and f"{256 * _MiB:,}" in str(info.value)


def test_the_output_limit_is_an_operator_setting_with_a_ceiling() -> None:
    small = CppExecutor(config={"max_output_bytes": 1000})
    with pytest.raises(InvalidRequest, match="max_output_bytes"):
        small.call("gaussian_blur", np.zeros((20, 20), np.float32))  # 1600 bytes out
    assert small.call("gaussian_blur", np.zeros((10, 10), np.float32)).shape == (10, 10)
    with pytest.raises(ConfigError, match="max_output_bytes must be an integer from 1 to"):
        CppExecutor(config={"max_output_bytes": 1 << 50})


def test_requirements_reserve_inputs_outputs_and_working_memory(cpp: CppExecutor) -> None:
    image = np.zeros((100, 100), np.float32)
    needs = cpp.requirements(Request("cpp/resize", image, params={"width": 4000, "height": 3000}))
    assert needs.memory_mb * _MiB >= image.nbytes + 4000 * 3000 * 4
    blur = cpp.requirements(Request("cpp/gaussian_blur", image))
    assert blur.memory_mb * _MiB >= 2 * image.nbytes


@pytest.mark.anyio
async def test_a_scheduler_refuses_what_it_could_never_reserve(cpp: CppExecutor) -> None:
    from edgecompute.errors import InfeasibleRequest

    async with Scheduler(Registry([cpp]), capacity=Resources(cpu=2, memory_mb=64), config=Config()) as s:
        with pytest.raises(InfeasibleRequest):  # 5000 x 5000 float32 = 95 MiB out, plus the input
            await s.run("cpp/resize", np.zeros((10, 10), np.float32), params={"width": 5000, "height": 5000})
        out = (await s.run("cpp/resize", np.zeros((10, 10), np.float32), params={"width": 20, "height": 20}))
        assert out.outputs.shape == (20, 20)


# -- strictness: names, params, dimensions ---------------------------------------------------------

def test_fir_filter_with_an_unknown_input_name_is_refused(cpp: CppExecutor) -> None:
    taps, signal = np.ones(3), np.arange(10.0)
    with pytest.raises(InvalidRequest, match=r"unknown input 'x'; fir_filter takes signal, taps"):
        cpp.call("fir_filter", {"taps": taps, "x": signal})
    # by name in any order, as before
    np.testing.assert_allclose(cpp.call("fir_filter", {"taps": taps, "signal": signal}),
                               np.convolve(signal, taps)[:10])


def test_an_unknown_param_is_refused_with_a_suggestion(cpp: CppExecutor) -> None:
    with pytest.raises(InvalidRequest, match=r"unknown param 'sigam' \(did you mean 'sigma'\?\).*sigma, truncate"):
        cpp.call("gaussian_blur", np.zeros((8, 8), np.float32), {"sigam": 5})


def test_an_extra_input_is_refused(cpp: CppExecutor) -> None:
    image = np.zeros((8, 8), np.float32)
    with pytest.raises(InvalidRequest, match=r"gaussian_blur takes 1 input\(s\) \(image\), got 2"):
        cpp.call("gaussian_blur", [image, image])
    with pytest.raises(InvalidRequest, match="unknown input 'mask'"):
        cpp.call("gaussian_blur", {"image": image, "mask": image})


def test_a_nine_dimensional_array_is_invalid_request_not_index_error(cpp: CppExecutor) -> None:
    x = np.zeros((1,) * 9, np.float32)
    with pytest.raises(InvalidRequest, match="9 dimensions; at most 8"):
        cpp.call("sum", x)


@pytest.mark.anyio
async def test_nine_dimensions_through_the_scheduler_fast_path(cpp: CppExecutor) -> None:
    async with Scheduler(Registry([cpp]), config=Config()) as s:
        with pytest.raises(InvalidRequest, match="9 dimensions"):
            await s.run("cpp/sum", np.zeros((1,) * 9, np.float32))


@pytest.mark.parametrize(("params", "match"), [
    ({"width": float("nan"), "height": 4}, "param 'width' must be an integer"),
    ({"width": True, "height": 4}, "param 'width' must be an integer"),
    ({"width": 4, "height": 2**70}, "param 'height' must be an integer from 1 to 1048576"),
    ({"width": -4, "height": 4}, "param 'width'"),
])
def test_resize_params_are_typed_and_ranged(cpp: CppExecutor, params: dict[str, object], match: str) -> None:
    with pytest.raises(InvalidRequest, match=match):
        cpp.call("resize", np.zeros((4, 4), np.float32), params)


def test_process_isolation_checks_before_sending_work() -> None:
    executor = CppExecutor({"isolation": "process", "workers": 1})
    try:
        executor.algorithms()
        with pytest.raises(InvalidRequest, match="unknown param 'sigam'"):
            executor.call("gaussian_blur", np.zeros((8, 8), np.float32), {"sigam": 5})
        with pytest.raises(InvalidRequest, match="max_output_bytes"):
            executor.call("resize", np.zeros((1, 1), np.uint8), {"width": 20000, "height": 20000})
        assert executor.metrics() == {}  # nothing was sent: a call sent to a worker is counted
    finally:
        import asyncio

        asyncio.run(executor.aclose())


# -- beyond the list: work and lengths bounded -------------------------------------------------------

def test_quadratic_blur_work_is_bounded() -> None:
    executor = CppExecutor(config={"max_work": 10**8})
    image = np.zeros((200, 200), np.float32)
    with pytest.raises(InvalidRequest, match=r"estimated work.*max_work"):
        executor.call("gaussian_blur", image, {"sigma": 1000, "truncate": 100})  # radius 100,000
    assert executor.call("gaussian_blur", image, {"sigma": 2}).shape == (200, 200)


def test_fir_filter_work_is_bounded() -> None:
    executor = CppExecutor(config={"max_work": 10**6})
    with pytest.raises(InvalidRequest, match="max_work"):
        executor.call("fir_filter", {"signal": np.zeros(10_000), "taps": np.zeros(1000)})


def test_fft_length_is_bounded() -> None:
    executor = CppExecutor(config={"max_fft_length": 1024})
    with pytest.raises(InvalidRequest, match=r"transform length.*2,048.*max_fft_length"):
        executor.call("fft", np.zeros(2048))
    assert executor.call("fft", np.zeros(1024)).shape == (1024,)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(h=st.integers(1, 40), w=st.integers(1, 40), ch=st.sampled_from([0, 1, 3]),
       oh=st.integers(1, 300), ow=st.integers(1, 300), limit=st.integers(1, 200_000),
       dtype=st.sampled_from(["uint8", "float32"]))
def test_resize_output_bound_is_exact_and_reserved(h: int, w: int, ch: int, oh: int, ow: int, limit: int,
                                                   dtype: str) -> None:
    """Refused exactly when the output would exceed the limit; what runs was reserved."""
    executor = _limited(limit)
    image = np.zeros((h, w, ch) if ch else (h, w), dtype)
    out_bytes = oh * ow * max(ch, 1) * np.dtype(dtype).itemsize
    params = {"width": ow, "height": oh}
    if out_bytes > limit:
        with pytest.raises(InvalidRequest, match="max_output_bytes"):
            executor.call("resize", image, params)
        return
    out = executor.call("resize", image, params)
    assert out.nbytes == out_bytes
    reserved = executor.requirements(Request("cpp/resize", image, params=params)).memory_mb * _MiB
    assert reserved >= image.nbytes + out.nbytes


_LIMITED: dict[int, CppExecutor] = {}


def _limited(limit: int) -> CppExecutor:
    executor = _LIMITED.get(limit)
    if executor is None:
        executor = _LIMITED[limit] = CppExecutor(config={"max_output_bytes": limit})
    return executor


@settings(max_examples=80, deadline=None)
@given(params=st.dictionaries(
    st.sampled_from(["sigma", "truncate", "sigam", "order"]),
    st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**20, 10**20), st.booleans(),
              st.text(max_size=3), st.lists(st.floats(-10, 2000), max_size=3), st.none()),
    max_size=3))
def test_hostile_blur_params_succeed_or_raise_invalid_request(params: dict[str, object]) -> None:
    executor = _limited(256 * _MiB)
    try:
        out = executor.call("gaussian_blur", np.ones((16, 16), np.float32), params)
    except InvalidRequest:
        return
    assert out.shape == (16, 16) and np.isfinite(out).all()
