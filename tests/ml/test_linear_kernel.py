"""edgecompute_ml's own float32 linear (``_kernels/linear.cpp``, ``torch.ops.edgecompute_ml.f32_linear``,
weights in blocks of 16 columns with AVX-512, 8 with AVX2): against ``F.linear`` at every row
count its sweeps cut differently, the residual and bias added in the kernel, clear errors for
misuse, the layout each instruction set reads, and the fallback to oneDNN when it is off or
cannot build."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F

from edgecompute_ml._architectures.dense import Dense, linear, pack_blocks, packing_for
from edgecompute_ml._kernels import build

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def kernel():
    if not build.load_linear():
        pytest.fail(f"the float32 linear kernel did not load here: {build.linear_status()}")
    return torch.ops.edgecompute_ml.f32_linear


def _cpu_isas() -> list[str]:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    return ["avx2"] + (["avx512"] if "avx512f" in flags else [])


@pytest.fixture(params=_cpu_isas())
def isa(request, kernel):
    """Each instruction set this CPU has (an AVX-512 machine runs the AVX2 sweeps too)."""
    best = int(torch.ops.edgecompute_ml.linear_isa(-1))
    torch.ops.edgecompute_ml.linear_isa({"avx2": 1, "avx512": 2}[request.param])
    yield request.param
    torch.ops.edgecompute_ml.linear_isa(best)


@pytest.mark.parametrize("m", [1, 2, 7, 11, 12, 13, 24, 25, 100])
@pytest.mark.parametrize(("n", "k"), [(16, 8), (40, 33), (20, 9), (24, 3), (384, 384), (1, 5), (1536, 64)])
def test_equals_f_linear_for_every_row_count_and_ragged_width(kernel, isa, m, n, k):
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    w, b, x = torch.randn(n, k, generator=g), torch.randn(n, generator=g), torch.randn(m, k, generator=g)
    residual = torch.randn(m, n, generator=g)
    packed = pack_blocks(w)
    lanes = {"avx2": 8, "avx512": 16}[isa]
    assert packed.shape == (-(-n // lanes), k, lanes)
    # within float32's rounding bound of a k-term sum, against the float64 product
    exact = x.double() @ w.double().t()
    bound = (k + 1) * 2.0 ** -24 * ((x.abs().double() @ w.abs().double().t()) + b.abs().double()) + 1e-30
    assert ((kernel(x, packed, b, None, n).double() - (exact + b.double())).abs() <= bound).all()
    assert ((kernel(x, packed, None, None, n).double() - exact).abs() <= bound).all()
    # the residual is added after the bias, as a separate add would: the same bits
    y = kernel(x, packed, b, None, n)
    assert torch.equal(kernel(x, packed, b, residual, n), residual + y)
    # GELU (erf) on the way out: torch's own erf approximation's accuracy (1.5e-7) on y's scale
    gelu = kernel(x, packed, b, None, n, True)
    assert ((gelu - F.gelu(y)).abs() <= 4e-7 * (1 + y.abs())).all()


def test_gelu_follows_erf_over_its_whole_range(kernel, isa):
    # the identity weight passes x through: GELU's far tails (exp underflows, erf saturates), zero
    # and the values between, against torch's exact GELU
    x = torch.cat([torch.linspace(-30, 30, 4801), torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e4, -1e4])])
    x = x[: x.numel() // 16 * 16].view(-1, 16)
    got = kernel(x, pack_blocks(torch.eye(16)), torch.zeros(16), None, 16, True)
    expected = F.gelu(x.double()).float()
    assert ((got - expected).abs() <= 4e-7 * (1 + x.abs())).all()
    assert torch.isfinite(got).all()


def test_keeps_the_leading_shape_and_reads_strided_inputs(kernel, isa):
    g = torch.Generator().manual_seed(3)
    w, b = torch.randn(48, 32, generator=g), torch.randn(48, generator=g)
    x = torch.randn(3, 32, 5, generator=g).transpose(1, 2)  # [3, 5, 32], not contiguous
    y = kernel(x, pack_blocks(w), b, None, 48)
    assert y.shape == (3, 5, 48)
    torch.testing.assert_close(y, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    assert kernel(torch.zeros(0, 32), pack_blocks(w), b, None, 48).shape == (0, 48)


def test_misuse_is_a_clear_error(kernel):
    w, b = torch.randn(40, 32), torch.randn(40)
    packed = pack_blocks(w)
    cases = [
        ((torch.randn(2, 31), packed, b, None, 40), "x has 31 features, the weight 32"),
        ((torch.randn(2, 32), packed, b, None, 99), f"n=99 does not fit a weight of {packed.shape[0]} blocks"),
        ((torch.randn(2, 32), w, b, None, 40), "packed float32"),
        ((torch.randn(2, 32).double(), packed, b, None, 40), "float32 CPU tensor"),
        ((torch.randn(2, 32), packed, torch.randn(39), None, 40), "bias must be contiguous float32"),
        ((torch.randn(2, 32), packed, b, torch.randn(2, 41), 40), "residual must be float32 shaped like"),
        ((torch.randn(2, 32), packed, b, torch.randn(2, 40), 40, True), "a residual or gelu, not both"),
        ((torch.randn(2, 0), pack_blocks(torch.randn(40, 0)), b, None, 40), "no input features"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            kernel(*args)


def test_the_layout_picks_the_instructions_and_16_columns_need_avx512(kernel):
    # a weight packed by hand in 16-column blocks: AVX-512's layout, run by AVX-512's sweeps where
    # the CPU has them, a clear error where it has not (never read as 8-column blocks)
    g = torch.Generator().manual_seed(5)
    w, b, x = torch.randn(40, 32, generator=g), torch.randn(40, generator=g), torch.randn(3, 32, generator=g)
    wide = torch.zeros(48, 32)
    wide[:40] = w
    wide = wide.view(3, 16, 32).transpose(1, 2).contiguous()
    if "avx512" in _cpu_isas():
        torch.testing.assert_close(kernel(x, wide, b, None, 40), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    else:
        with pytest.raises(RuntimeError, match="16-column blocks needs AVX-512F"):
            kernel(x, wide, b, None, 40)
    # the same columns, 8 a block (the sixth, all padding, dropped)
    narrow = wide.view(3, 32, 2, 8).permute(0, 2, 1, 3).reshape(6, 32, 8)[:5].contiguous()
    torch.testing.assert_close(kernel(x, narrow, b, None, 40), F.linear(x, w, b), rtol=1e-5, atol=1e-5)

def test_dense_and_the_scripted_helper_take_the_kernel(kernel):
    g = torch.Generator().manual_seed(4)
    w, b = torch.randn(50, 24, generator=g), torch.randn(50, generator=g)
    x, residual = torch.randn(2, 9, 24, generator=g), torch.randn(2, 9, 50, generator=g)
    plain, gelu = Dense(w.clone(), b, CPU, torch.float32), Dense(w.clone(), b, CPU, torch.float32, gelu=True)
    assert plain.packing == gelu.packing == "blocks" == packing_for(CPU, torch.float32)
    torch.testing.assert_close(plain(x), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gelu(x), F.gelu(F.linear(x, w, b)), rtol=1e-5, atol=1e-5)
    assert torch.equal(plain(x, residual), residual + plain(x))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(linear)
    assert torch.equal(scripted(x, plain.weight, b, residual, False, True), plain(x, residual))
    assert torch.equal(scripted(x, plain.weight, b, None, True, True), gelu(x))


_PROBE = textwrap.dedent("""
    import logging, sys, torch
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    from edgecompute_ml._architectures.dense import Dense
    from edgecompute_ml._kernels import build
    g = torch.Generator().manual_seed(0)
    w, b, x = torch.randn(40, 64, generator=g), torch.randn(40, generator=g), torch.randn(3, 64, generator=g)
    layer = Dense(w.clone(), b, torch.device("cpu"), torch.float32)
    error = float((layer(x) - torch.nn.functional.linear(x, w, b)).abs().max())
    print(layer.packing, error, build.linear_status())
""")


def _probe(tmp_path, **env):
    full = {**os.environ, "EDGECOMPUTE_ML_CACHE": str(tmp_path / "cache"), **env}
    done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=full, timeout=300)
    assert done.returncode == 0, done.stderr
    packing, error, *reason = done.stdout.split()
    return packing, float(error), " ".join(reason), done.stderr


@pytest.mark.parametrize(("env", "why"), [({"CXX": "/nonexistent/c++"}, "no C++ compiler"),
                                          ({"CXX": "false"}, "compiling linear.cpp failed"),
                                          ({build.LINEAR_DISABLE_ENV: "0"}, "turned off")])
def test_fallback_to_onednn_is_logged_with_its_reason(tmp_path, env, why):
    packing, error, reason, log = _probe(tmp_path, **env)
    assert packing == "onednn" and why in reason
    assert why in log and "oneDNN's packed kernel" in log
    assert error < 1e-4
    assert not list((tmp_path / "cache").rglob("linear-*.so"))


def test_the_switch_is_read_at_each_load(kernel, monkeypatch):
    w = torch.randn(16, 16)
    monkeypatch.setenv(build.LINEAR_DISABLE_ENV, "off")
    assert Dense(w, None, CPU, torch.float32).packing == "onednn"
    assert build.linear_status() == f"turned off ({build.LINEAR_DISABLE_ENV}=off)"
    monkeypatch.delenv(build.LINEAR_DISABLE_ENV)
    assert Dense(w, None, CPU, torch.float32).packing == "blocks"
    assert build.linear_status() is None


def _attention_reference(qkv, mask, heads):
    b, t, width = qkv.shape
    d = width // 3 // heads
    q, k, v = qkv.double().view(b, t, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)
    m = None if mask is None else mask.view(b, 1, 1, t)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=m).transpose(1, 2).reshape(b, t, heads * d).float()


@pytest.mark.parametrize(("batch", "t", "heads", "d"), [(2, 5, 3, 8), (32, 12, 12, 32), (1, 10, 12, 32),
                                                        (3, 37, 2, 64), (1, 1, 1, 8), (2, 70, 1, 40)])
def test_encoder_attention_equals_attention_over_the_fused_projection(kernel, batch, t, heads, d):
    attend = torch.ops.edgecompute_ml.encoder_attention
    g = torch.Generator().manual_seed(batch * t + heads + d)
    qkv = torch.randn(batch, t, 3 * heads * d, generator=g)
    mask = torch.ones(batch, t, dtype=torch.bool)
    mask[::2, max(1, t - 3):] = False  # padded sentences: their last keys masked
    for m in (None, mask, mask.view(batch, 1, 1, t)):
        got = attend(qkv, m, heads)
        assert got.shape == (batch, t, heads * d)
        torch.testing.assert_close(got, _attention_reference(qkv, None if m is None else m.reshape(batch, t), heads),
                                   rtol=1e-5, atol=2e-6)
    # a masked key's values never reach the result, however large
    poisoned = qkv.clone().view(batch, t, 3, heads * d)
    poisoned[:, :, 2][~mask] = 1e30
    assert torch.equal(attend(poisoned.view(batch, t, -1), mask, heads), attend(qkv, mask, heads))


def test_encoder_attention_gives_zeros_where_every_key_is_masked_and_names_misuse(kernel):
    attend = torch.ops.edgecompute_ml.encoder_attention
    qkv = torch.randn(2, 4, 3 * 2 * 8)
    mask = torch.tensor([[True, True, False, False], [False] * 4])
    out = attend(qkv, mask, 2)
    assert torch.equal(out[1], torch.zeros(4, 16))
    torch.testing.assert_close(out[:1], _attention_reference(qkv[:1], mask[:1], 2), rtol=1e-5, atol=2e-6)
    cases = [
        ((qkv, None, 5), "48 columns are not q, k and v of 5 heads"),
        ((torch.randn(1, 3, 36), None, 2), "multiple of 8"),
        ((qkv.double(), None, 2), "float32 CPU tensor"),
        ((qkv[0], None, 2), "float32 CPU tensor"),
        ((qkv, mask.long(), 2), "key_mask must be bool"),
        ((qkv, mask[:, :3], 2), "key_mask must be bool"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            attend(*args)
