"""edgecompute_ml's own 4-bit kernel (``_kernels/q4.cpp``, the native ``q4`` layout of
``_formats/quant.py``): against a torch reference doing the same integer arithmetic (activations
as two int8 terms per 32, exact integer dots with the 4-bit codes, then the scales), against the dequantised
float matmul, its Meta impl under tracing, the build cache and the fallback to torch's int4 kernel.

Stated tolerance: the kernel and the reference differ only in float32 rounding of the scaled sums
(relative 1e-5 of the output's scale); against the float matmul of the dequantised weight, the
activations' two int8 terms (about 16 bits a value) cost less than 1e-4 (relative norm)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from edgecompute_ml._formats import quant  # noqa: E402
from edgecompute_ml._kernels import build  # noqa: E402

GROUP = 32


@pytest.fixture(scope="module")
def kernel():
    if not build.load_q4():
        pytest.fail(f"the q4 kernel did not load here: {build.q4_status()}")
    return torch.ops.edgecompute_ml


def _isas():
    """The instruction sets this CPU runs (2: AVX-512 VNNI, 1: AVX2), asked of the loaded kernel."""
    if not build.load_q4():
        return [0]
    best = int(torch.ops.edgecompute_ml.q4_isa(-1))
    return [isa for isa in (2, 1) if isa <= best]


@pytest.fixture(params=_isas(), ids=lambda isa: {2: "avx512vnni", 1: "avx2", 0: "none"}[isa])
def isa(request, kernel):
    best = int(kernel.q4_isa(-1))
    kernel.q4_isa(request.param)
    yield request.param
    kernel.q4_isa(best)


def _codes(n, k, offsets, seed, exact=True):
    """Random 4-bit codes; with ``exact``, scales and offsets as a GGUF file holds them (float16
    scale and minimum: w = q * d + m, so offset = m + 8 d)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    d = torch.rand(n, k // GROUP, generator=g) * 0.05 + 0.001
    m = torch.randn(n, k // GROUP, generator=g) * 0.1
    if exact:
        d, m = d.half().float(), m.half().float()
    return quant.Q4Codes(q, d, m + 8 * d if offsets else torch.zeros_like(d))


def _reference(x, codes):
    """The kernel's arithmetic in torch: x [M, K] per 32 as two int8 terms of d = max|x| / 127
    (t = x / d, q1 = round(t), q2 = round(256 (t - q1)), rounding half to even), exact integer
    dots 256 * (codes . q1) + codes . q2, then d / 256 * scale and the low term."""
    m, k = x.shape
    xg = x.view(m, k // GROUP, GROUP)
    d = xg.abs().amax(-1) / 127.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    t = xg * inv[..., None]
    q1 = t.round()
    q2 = ((t - q1) * 256.0).round().clamp(-127, 127)
    qa = q1.double() * 256 + q2.double()  # exact integers
    qw = codes.codes.view(-1, k // GROUP, GROUP).double()
    dots = torch.einsum("mgi,ngi->mng", qa, qw)  # exact in float64 (< 2^53)
    step = d.double() / 256
    low = codes.offset.double() - 8.0 * codes.scale.double()  # w = q * scale + low
    y = (dots * (step[:, None, :] * codes.scale.double()[None])).sum(-1) + (qa.sum(-1) * step) @ low.t()
    return y


@pytest.mark.parametrize("offsets", [False, True], ids=["Q4_0", "Q4_1"])
@pytest.mark.parametrize("m", [1, 3, 17, 100])
def test_the_kernel_is_the_integer_arithmetic_of_int8_activations(isa, offsets, m):
    # N not a multiple of 16 or 64; K = 17 groups: a full block of 16 groups and a masked tail
    n, k = 45, 17 * GROUP
    codes = _codes(n, k, offsets, seed=m)
    w = quant.QuantizedLinear(codes)
    assert w.native and (w.low is None) == (not offsets)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(100 + m)) * 2
    x[0, :GROUP] = 0.0  # a group of zeros (scale 0)
    got = w(x)
    want = _reference(x, codes)
    assert got.dtype == torch.float32 and got.shape == (m, n)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    # and within the activations' rounding of the float matmul of the dequantised weight
    exact = x.double() @ codes.dequantize().double().t()
    assert float((got.double() - exact).norm() / exact.norm()) < 1e-4
    # batch dimensions, another activation dtype, a bias
    bias = torch.randn(n)
    y = quant.linear(x.view(1, m, k).to(torch.bfloat16), w, bias.to(torch.bfloat16))
    assert y.shape == (1, m, n) and y.dtype == torch.bfloat16


@pytest.mark.parametrize("offsets", [False, True], ids=["Q4_0", "Q4_1"])
@pytest.mark.parametrize("k", [GROUP, 17 * GROUP, 64 * GROUP])
def test_a_prompts_rows_are_each_exactly_the_one_row_product(isa, offsets, k):
    # a prompt's rows pass the weight in pairs against pairs of weight rows, a decode step's one
    # row against one weight row at a time: every output must still be the same float32 number
    # (a row's product may not depend on how many rows share the call); odd row counts leave a
    # row alone, N = 37 an odd weight row, K a tail of groups
    n = 37
    codes = _codes(n, k, offsets, seed=k + offsets)
    w = quant.QuantizedLinear(codes)
    x = torch.randn(7, k, generator=torch.Generator().manual_seed(k)) * 3
    alone = torch.cat([w(x[i:i + 1]) for i in range(7)])
    for m in (2, 3, 5, 7):
        assert torch.equal(w(x[:m]), alone[:m]), m
    torch.testing.assert_close(alone.double(), _reference(x, codes), rtol=1e-5,
                               atol=1e-5 * float(alone.abs().max()))


# a short last block: on AVX2 compact up to 8 groups (2: one vector of lanes; 4, 8: several),
# masked beyond (9, 12: Whisper's 384 inputs, 14, 15); whole blocks (16, 32) carry no mask
@pytest.mark.parametrize("groups", [1, 3, 4, 12, 16, 18, 24, 25, 30, 31, 32, 35])
@pytest.mark.parametrize("m", [1, 2, 5])  # 1: AVX2 pairs the weight rows of up to 1024 inputs; 19 rows: an odd last one
def test_every_tail_of_groups(isa, groups, m):
    k = groups * GROUP
    codes = _codes(19, k, True, seed=k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k))
    got = quant.QuantizedLinear(codes)(x)
    want = _reference(x, codes)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_the_op_checks_its_arguments(kernel):
    codes = quant.QuantizedLinear(_codes(8, 64, False, seed=1))
    with pytest.raises(RuntimeError, match="float32"):
        kernel.q4_linear(torch.zeros(2, 64, dtype=torch.float64), codes.packed, codes.scales, None)
    with pytest.raises(RuntimeError, match="K must be"):
        kernel.q4_linear(torch.zeros(2, 96), codes.packed, codes.scales, None)


def test_the_meta_impl_gives_the_shape_under_tracing(kernel):
    from torch._subclasses.fake_tensor import FakeTensorMode

    w = quant.QuantizedLinear(_codes(45, 96, True, seed=2))
    out = kernel.q4_linear(torch.empty(7, 96, device="meta"), w.packed.to("meta"), w.scales.to("meta"),
                           w.low.to("meta"))
    assert out.shape == (7, 45) and out.device.type == "meta" and out.dtype == torch.float32
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = w(torch.empty(3, 5, 96))
    assert fake.shape == (3, 5, 45)


def test_torch_compile_keeps_the_op_in_one_graph(kernel):
    w = quant.QuantizedLinear(_codes(45, 96, True, seed=3))

    def f(x):
        return torch.relu(quant.linear(x, w)) * 2.0

    x = torch.randn(3, 96)
    explained = torch._dynamo.explain(f)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    ops = [node.target for g in explained.graphs for node in g.graph.nodes if node.op == "call_function"]
    assert torch.ops.edgecompute_ml.q4_linear in ops or torch.ops.edgecompute_ml.q4_linear.default in ops
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), f(x), rtol=0, atol=0)


@pytest.mark.parametrize("offsets", [False, True], ids=["Q4_0", "Q4_1"])
def test_rows_are_read_from_the_native_layout_exactly(kernel, offsets):
    codes = _codes(130, 96, offsets, seed=4)
    w = quant.prepare(codes, rows=True)
    assert w.native and w.looked_up
    assert w.row_group_scale is None and w.row_offset is None  # float16 holds the file's scales: no copy
    ids = torch.tensor([[0, 1, 63, 64, 129], [5, 5, 77, 128, 2]])
    torch.testing.assert_close(quant.embedding(ids, w, torch.float32), codes.dequantize()[ids], atol=0, rtol=0)
    assert w.nbytes == 130 * 96 // 2 + 130 * 3 * 2 * (2 if offsets else 1)


def test_rows_keep_the_scales_float16_does_not_hold(kernel):
    codes = _codes(50, 64, True, seed=5, exact=False)  # Q4_K-like: products of scales, not float16
    w = quant.prepare(codes, rows=True)
    assert w.native and w.row_group_scale is not None and w.row_offset is not None
    ids = torch.arange(50)
    torch.testing.assert_close(quant.embedding(ids, w, torch.float32), codes.dequantize(), atol=0, rtol=0)
    x = torch.randn(2, 64) * 30
    top = (x @ codes.dequantize().t()).topk(4, dim=-1).indices
    torch.testing.assert_close(quant.logits(x, w).gather(1, top), (x @ codes.dequantize().t()).gather(1, top),
                               atol=1e-3, rtol=1e-5)
    # without rows the float32 copies are not kept
    assert quant.prepare(codes).row_group_scale is None


def test_one_openmp_runtime_in_the_process(kernel):
    """The library links libgomp, which must resolve to the copy torch loaded (one thread pool)."""
    maps = Path("/proc/self/maps").read_text()
    runtimes = {line.split()[-1] for line in maps.splitlines()
                if any(name in line for name in ("libgomp", "libomp", "libiomp"))}
    assert len(runtimes) == 1, runtimes
    assert kernel.q4_isa(-1) > 0


_PROBE = textwrap.dedent("""
    import logging, sys, torch
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    from edgecompute_ml._formats import quant
    from edgecompute_ml._kernels import build
    g = torch.Generator().manual_seed(0)
    codes = quant.Q4Codes(torch.randint(0, 16, (40, 64), dtype=torch.uint8, generator=g),
                          torch.rand(40, 2, generator=g).half().float(), torch.zeros(40, 2))
    w = quant.QuantizedLinear(codes)
    x = torch.randn(3, 64, generator=g)
    y = w(x)
    exact = x @ codes.dequantize().t()
    print(w.native, build.q4_status(), float((y - exact).norm() / exact.norm()))
""")


def _probe(tmp_path, **env):
    full = {**os.environ, "EDGECOMPUTE_ML_CACHE": str(tmp_path / "cache"), **env}
    done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=full, timeout=300)
    assert done.returncode == 0, done.stderr
    native, *reason, rel = done.stdout.split()
    return native == "True", " ".join(reason), float(rel), done.stderr


@pytest.mark.parametrize(("env", "why"), [({"CXX": "/nonexistent/c++"}, "no C++ compiler"),
                                          ({"CXX": "false"}, "compiling q4.cpp failed"),
                                          ({build.DISABLE_ENV: "0"}, "turned off")])
def test_fallback_to_torchs_int4_kernel_is_logged_with_its_reason(tmp_path, env, why):
    native, reason, rel, log = _probe(tmp_path, **env)
    assert not native and why in reason
    assert why in log and "torch's int4 kernel" in log  # logged once, with the reason
    assert rel < 0.01  # the torch path's result (bfloat16 activations)
    assert not list((tmp_path / "cache").rglob("*.so"))


def test_concurrent_first_builds_share_one_cached_library(tmp_path):
    """Two processes compile at once into a fresh cache (temporary name, then rename); a third
    loads the cached library without running the compiler."""
    calls = tmp_path / "calls.log"
    wrapper = tmp_path / "cxx"
    real = os.environ.get("CXX") or "c++"
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    env = {**os.environ, "EDGECOMPUTE_ML_CACHE": str(tmp_path / "cache"), "CXX": str(wrapper)}
    procs = [subprocess.Popen([sys.executable, "-c", _PROBE], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
        assert out.split()[0] == "True", err
    built = list((tmp_path / "cache" / "kernels").iterdir())
    assert len(built) == 1 and built[0].name.startswith("q4-") and built[0].suffix == ".so", built
    compiles = [line for line in calls.read_text().splitlines() if "-shared" in line]
    assert 1 <= len(compiles) <= 2
    native, reason, _, _ = _probe(tmp_path, CXX=str(wrapper))
    assert native and reason == "None"
    assert len([line for line in calls.read_text().splitlines() if "-shared" in line]) == len(compiles)
