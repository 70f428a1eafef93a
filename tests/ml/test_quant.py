"""Quantized weights stay quantized: GGUF Q4_0/Q4_1/Q4_K kept as 4-bit codes, other types and
``dtype = "int8"`` as per-row int8, multiplied by edgecompute_ml's 4-bit kernel or torch's packed
CPU kernels; against the dequantised float path of the same weights.

Stated tolerance: the kernels round activations to bfloat16 or finer (float32 accumulation), so one matmul is
exact to ~0.3% (relative norm) and the logits of a 3-layer model to 4% relative norm (largest
error seen: 3% of the largest logit); greedy choices agree wherever the float path's top two
logits are further apart than 5% of the largest."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")

from edgecompute_ml._formats import quant  # noqa: E402
from edgecompute_ml._formats.gguf import dequantize, quantized_codes  # noqa: E402
from edgecompute_ml._kernels import build  # noqa: E402
from edgecompute_ml._runtime.plan import ModelSource  # noqa: E402
from edgecompute_ml._runtime.store import inspect_model, load_model  # noqa: E402
from edgecompute_ml._tasks.generation import GenerationParams, generate  # noqa: E402
from edgecompute_ml.errors import UnsupportedModelOption  # noqa: E402

from .tiny_families import make_decoder, write_family_gguf  # noqa: E402

Q = gguf.GGMLQuantizationType
REL = 0.04  # logits, relative norm, quantized vs dequantised float path (see the module doc)
GAP = 0.05  # a clear greedy choice: top two float logits further apart than 5% of the row's largest


def _rel(a, b):
    return float((a - b).norm() / b.norm())


# -- kernels ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [96, 40])  # 40: not a multiple of the packer's 16 rows (padded)
def test_q4_and_int8_kernels_match_the_float_matmul_of_their_weights(n):
    g = torch.Generator().manual_seed(0)
    k = 128
    codes = quant.Q4Codes(torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g),
                          torch.rand(n, k // 32, generator=g) * 0.05, torch.randn(n, k // 32, generator=g) * 0.05)
    x = torch.randn(5, 3, k, generator=g)
    bias = torch.randn(n, generator=g)
    for c in (codes, quant.quantize_int8(codes.dequantize())):
        w = c.dequantize()
        packed = quant.QuantizedLinear(c)
        got = quant.linear(x, packed, bias)
        assert got.shape == (5, 3, n) and got.dtype == torch.float32
        assert _rel(got, x @ w.t() + bias) < 0.01
        # 4 bits a weight and a bfloat16 scale and offset per 32 (5 bits), or 8 bits and a scale per row
        rows = (n + 15) // 16 * 16 if c is codes else n  # the 4-bit packer pads to 16 rows
        assert packed.nbytes <= rows * k * 4 / (6.4 if c is codes else 3.5)


def test_fused_weights_of_different_forms_run_as_parts():
    g = torch.Generator().manual_seed(1)
    a = quant.Q4Codes(torch.randint(0, 16, (32, 64), dtype=torch.uint8, generator=g), torch.rand(32, 2) * 0.1,
                      torch.zeros(32, 2))
    b = quant.quantize_int8(torch.randn(16, 64, generator=g))
    fused = quant.fuse([a, b])
    x = torch.randn(2, 64, generator=g)
    assert _rel(quant.linear(x, fused), x @ torch.cat([a.dequantize(), b.dequantize()]).t()) < 0.01
    same = quant.fuse([a, a])
    assert isinstance(same, quant.QuantizedLinear) and same.shape == (64, 64)
    floats = [torch.ones(2, 3), torch.zeros(1, 3)]
    assert torch.equal(quant.fuse(floats), torch.cat(floats))


def test_embedding_rows_are_exact_and_top_logits_are_recomputed_in_float32():
    g = torch.Generator().manual_seed(2)
    codes = quant.quantize_int8(torch.randn(500, 64, generator=g))
    w = codes.dequantize()
    packed = quant.prepare(codes, rows=True)
    ids = torch.tensor([[3, 499, 0]])
    torch.testing.assert_close(quant.embedding(ids, packed, torch.float32), w[ids], atol=0, rtol=0)
    x = torch.randn(4, 64, generator=g) * 30  # large logits: bfloat16 output steps of 0.5 and more
    exact = x @ w.t()
    approx = packed(x).float()
    got = quant.logits(x, packed)
    top = exact.topk(8, dim=-1).indices
    torch.testing.assert_close(got.gather(1, top), exact.gather(1, top), atol=1e-3, rtol=1e-5)
    assert (approx.gather(1, top) - exact.gather(1, top)).abs().max() > 1e-2  # the kernel alone is not
    assert torch.equal(got.argmax(-1), exact.argmax(-1))


@pytest.mark.parametrize("offsets", [True, False])  # Q4_1 / Q4_K, and Q4_0 (no offsets kept)
def test_q4_rows_are_read_from_the_packed_codes_exactly(offsets):
    """A 4-bit token embedding (a Q4_0 file's, tied to the output) stays 4-bit: lookups unpack the
    rows from the kernel's own packed codes, with the file's scales, exactly."""
    g = torch.Generator().manual_seed(3)
    n, k = 200, 96  # 200: padded to the packer's 64-row blocks
    offset = torch.randn(n, k // 32, generator=g) * 0.05 if offsets else torch.zeros(n, k // 32)
    codes = quant.Q4Codes(torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g),
                          torch.rand(n, k // 32, generator=g) * 0.1, offset)
    w = codes.dequantize()
    packed = quant.prepare(codes, rows=True)
    assert packed.kind == "q4" and (packed.row_offset is None) == (not offsets)
    ids = torch.tensor([[0, 31, 32, 63, 64, 100, 199], [5, 5, 150, 96, 127, 128, 1]])
    torch.testing.assert_close(quant.embedding(ids, packed, torch.float32), w[ids], atol=0, rtol=0)
    x = torch.randn(4, k, generator=g) * 30
    exact = x @ w.t()
    got = quant.logits(x, packed)
    assert got.shape == (4, n)
    top = exact.topk(8, dim=-1).indices
    torch.testing.assert_close(got.gather(1, top), exact.gather(1, top), atol=1e-3, rtol=1e-5)
    assert (packed(x).float().gather(1, top) - exact.gather(1, top)).abs().max() > 1e-2
    # 4 bits a weight, the kernel's bfloat16 scale and offset and the file's float32 ones per 32
    assert packed.nbytes <= 256 * k * (0.5 + (8 + (8 if offsets else 4)) / 32)


def test_q8_0_rows_are_the_files_own_codes():
    """A Q8_0 token embedding (SmolLM2's file: Q4_1 layers, Q8_0 embeddings) is looked up and its
    top logits recomputed from the file's codes and per-32 scales, not from the per-row int8 codes
    the kernel multiplies by: those differ from the float path by up to half an int8 step."""
    data = np.random.default_rng(4).standard_normal((300, 64)).astype(np.float32)
    data[:, :32] *= 0.1  # the blocks of a row of very different scales
    raw = gguf.quants.quantize(data, Q.Q8_0).reshape(-1).view(np.uint8)
    codes = quantized_codes(raw, int(Q.Q8_0), (300, 64))
    exact = torch.from_numpy(dequantize(raw, int(Q.Q8_0), (300, 64)))
    assert isinstance(codes, quant.Int8Codes) and codes.scale.shape == (300, 2)
    torch.testing.assert_close(codes.dequantize(), exact, atol=0, rtol=0)
    packed = quant.prepare(codes, rows=True)
    ids = torch.tensor([[7, 299, 0]])
    torch.testing.assert_close(quant.embedding(ids, packed, torch.float32), exact[ids], atol=0, rtol=0)
    assert not torch.equal(quant.QuantizedLinear(codes).packed[ids[0]].float() * packed.row_scale[ids[0], None],
                           exact[ids[0]])  # the kernel's per-row form is not the file's
    x = torch.from_numpy(np.random.default_rng(5).standard_normal((3, 64)).astype(np.float32)) * 30
    want = x @ exact.t()
    top = want.topk(8, dim=-1).indices
    torch.testing.assert_close(quant.logits(x, packed).gather(1, top), want.gather(1, top), atol=1e-3, rtol=1e-5)
    assert quant.prepare(codes).row_codes is None  # a weight not looked up keeps the kernel's form only


@pytest.mark.skipif(not build.load_q4(), reason="the 4-bit screen needs edgecompute_ml's q4 kernel (a C++ compiler)")
def test_a_screened_q8_0_head_ranks_with_4_bits_and_scores_the_top_from_the_file():
    data = np.random.default_rng(6).standard_normal((4096, 128)).astype(np.float32) * 0.05
    raw = gguf.quants.quantize(data, Q.Q8_0).reshape(-1).view(np.uint8)
    codes = quantized_codes(raw, int(Q.Q8_0), (4096, 128))
    exact = torch.from_numpy(dequantize(raw, int(Q.Q8_0), (4096, 128)))
    screened, plain = quant.prepare(codes, rows=True, screen=True), quant.prepare(codes, rows=True)
    assert (screened.kind, screened.native, plain.kind) == ("q4", True, "int8")
    assert quant.tensor_bytes(screened) < 0.85 * quant.tensor_bytes(plain)  # the screen replaces the int8 copy
    ids = torch.tensor([[0, 4095, 17]])
    torch.testing.assert_close(quant.embedding(ids, screened, torch.float32), exact[ids], atol=0, rtol=0)
    x = torch.from_numpy(np.random.default_rng(7).standard_normal((64, 128)).astype(np.float32))
    want = x @ exact.t()
    got = quant.logits(x, screened)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    top = want.topk(8, dim=-1).indices
    torch.testing.assert_close(got.gather(1, top), want.gather(1, top), atol=1e-4, rtol=1e-5)
    rest = torch.ones_like(want, dtype=torch.bool).scatter_(1, got.topk(32, dim=-1).indices, False)
    assert 0 < float((got - want)[rest].abs().max()) < 0.1 * float(want.abs().max())  # the rest: 4-bit values
    assert quant.prepare(codes, rows=True, screen=True).row_codes is not None


# -- GGUF codes --------------------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_q4_gguf_blocks_are_kept_as_they_are(qtype):
    data = np.random.default_rng(0).standard_normal((64, 96)).astype(np.float32)
    packed = gguf.quants.quantize(data, Q[qtype])
    raw = packed.reshape(-1).view(np.uint8)
    codes = quantized_codes(raw, int(Q[qtype]), (64, 96))
    assert isinstance(codes, quant.Q4Codes)
    np.testing.assert_allclose(codes.dequantize().numpy(), dequantize(raw, int(Q[qtype]), (64, 96)),
                               rtol=1e-6, atol=1e-7)


def test_q4_k_blocks_are_kept_as_they_are():
    """Q4_K's 6-bit sub-block scales and mins are exactly a scale and an offset per 32 values."""
    rng = np.random.default_rng(1)
    blocks = rng.integers(0, 256, size=(16, 144), dtype=np.uint8)
    blocks[:, 0:4] = np.array([0.01, 0.02], dtype=np.float16).view(np.uint8)  # finite d, dmin
    codes = quantized_codes(blocks.reshape(-1), int(Q.Q4_K), (8, 512))
    assert isinstance(codes, quant.Q4Codes)
    np.testing.assert_allclose(codes.dequantize().numpy(), dequantize(blocks.reshape(-1), int(Q.Q4_K), (8, 512)),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("qtype", ["Q5_0", "Q5_1"])
def test_other_types_are_requantised_to_int8_rows(qtype):
    data = np.random.default_rng(2).standard_normal((32, 64)).astype(np.float32)
    raw = gguf.quants.quantize(data, Q[qtype]).reshape(-1).view(np.uint8)
    codes = quantized_codes(raw, int(Q[qtype]), (32, 64))
    assert isinstance(codes, quant.Int8Codes)
    exact = dequantize(raw, int(Q[qtype]), (32, 64))
    err = np.abs(codes.dequantize().numpy() - exact).max(axis=1)
    assert (err <= np.abs(exact).max(axis=1) / 254 + 1e-6).all()  # half an int8 step of the row
    assert quantized_codes(np.zeros(64 * 4, np.uint8), int(Q.F32), (64,)) is None


# -- models ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
    made = {}

    def get(name):
        if name not in made:
            made[name] = make_decoder(tmp_path_factory.mktemp(name), name, std=0.1)
        return made[name]
    return get


def _load(path, dtype=None):
    return load_model(inspect_model(ModelSource("m", str(path), dtype)), "float32", "cpu")


def _param_bytes(model):
    """Bytes of every tensor the model holds (packed ones included), each once."""
    seen, total = set(), 0
    for value in [model.embed, model.norm, model.lm_head] + [getattr(layer, s) for layer in model.layers
                                                              for s in type(layer).__slots__]:
        tensors = [value] if isinstance(value, torch.Tensor) else \
            [value.packed, value.scales, value.row_scale, value.row_codes, value.row_group_scale, value.row_offset] \
            if isinstance(value, quant.QuantizedLinear) else []
        for t in tensors:
            if t is not None and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def _teacher_forced_agreement(quantized, reference, ids):
    """Positions where the float path's top two logits are further apart than the error, and how
    many of those the quantized model's argmax agrees on."""
    a = quantized.model.forward(ids, quantized.model.new_cache(128), last_only=False)[0]
    b = reference.model.forward(ids, reference.model.new_cache(128), last_only=False)[0]
    top2 = b.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > GAP * b.abs().amax(dim=-1)
    return a, b, int(clear.sum()), int((a.argmax(-1) == b.argmax(-1))[clear].sum())


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
@pytest.mark.parametrize("name", ["llama3", "qwen2", "gemma3", "phi3"])
def test_quantized_gguf_runs_close_to_its_dequantised_weights(decoders, tmp_path, name, qtype):
    path = tmp_path / f"{name}-{qtype}.gguf"
    write_family_gguf(decoders(name), path, qtype)
    quantized, reference = _load(path), _load(path, "float32")
    assert quantized.quantization == "gguf" and reference.quantization is None
    ids = torch.tensor([list(range(3, 60))])
    a, b, clear, agree = _teacher_forced_agreement(quantized, reference, ids)
    head = quantized.model.lm_head
    if head.kind == "q4" and head.row_codes is not None:  # a Q8_0 head swept as a 4-bit screen: its
        top = b.topk(8, dim=-1).indices                    # top logits are the file's, the rest 4-bit
        assert _rel(a.gather(-1, top), b.gather(-1, top)) < REL and _rel(a, b) < 3 * REL
    else:
        assert _rel(a, b) < REL
    assert clear > 15 and agree == clear
    # nothing of the quantized weights is held in float32: 4 bits (Q4) or 8 bits (Q8_0) a weight
    held, floats = _param_bytes(quantized.model), _param_bytes(reference.model)
    assert quantized.bytes == quantized.model.weight_bytes() and held <= quantized.bytes
    # Q8_0 token embeddings and output rows are held twice: the file's codes (lookups and top
    # logits) and the kernel's per-row ones
    rows = {id(w): w for w in (quantized.model.embed, quantized.model.lm_head)}.values()
    second = sum(quant.tensor_bytes(w.row_codes) * (1 + 4 / 32) for w in rows if w.row_codes is not None)
    assert held - second < floats / (3.5 if qtype == "Q8_0" else 4.5)
    for layer in quantized.model.layers:
        assert isinstance(layer.qkv, quant.QuantizedLinear) and isinstance(layer.down, quant.QuantizedLinear)
        assert layer.qkv.kind == ("int8" if qtype == "Q8_0" else "q4")


@pytest.mark.parametrize(("qtype", "embed"), [("Q4_0", "Q4_0"), ("Q4_1", "Q8_0")])  # as llama.cpp mixes them
def test_greedy_tokens_of_a_quantized_gguf_equal_the_float_path(decoders, tmp_path, qtype, embed):
    """The token embeddings (tied to the output here) are looked up exactly as the float path's
    and the top logits recomputed from them; only the layers' matmuls round their activations
    (two int8 terms a value in edgecompute_ml's 4-bit kernel, bfloat16 in torch's kernels)."""
    path = tmp_path / f"llama3-{qtype}-{embed}.gguf"
    folder = decoders("llama3")
    assert json.loads((folder / "config.json").read_text())["tie_word_embeddings"]
    write_family_gguf(folder, path, qtype, {"model.embed_tokens.weight": embed})
    quantized, reference = _load(path), _load(path, "float32")
    quantized.eos_token_ids = reference.eos_token_ids = frozenset()
    screened = embed == "Q8_0" and build.load_q4()  # swept as a 4-bit screen, its top logits from the codes
    assert quantized.model.embed.kind == ("q4" if embed == "Q4_0" or screened else "int8")
    assert (quantized.model.embed.row_codes is not None) == (embed == "Q8_0")
    ids = torch.arange(quantized.model.config.vocab_size)
    torch.testing.assert_close(quant.embedding(ids, quantized.model.embed, torch.float32),
                               reference.model.embed[ids], atol=0, rtol=0)
    params = GenerationParams(max_new_tokens=24)
    distinct = set()
    for prompt in ([5, 6, 7], [40, 41, 42, 43, 44, 45], [90, 12, 33]):
        tokens = generate(reference, prompt, params)["tokens"]
        assert generate(quantized, prompt, params)["tokens"] == tokens
        distinct.update(tokens)
    assert len(distinct) > 5  # not one token repeated


@pytest.mark.parametrize("name", ["llama3", "qwen3", "gemma2"])
def test_int8_option_on_a_safetensors_folder(decoders, name):
    folder = decoders(name)
    quantized, reference = _load(folder, "int8"), _load(folder)
    assert quantized.quantization == "int8" and reference.quantization is None
    ids = torch.tensor([list(range(3, 60))])
    a, b, clear, agree = _teacher_forced_agreement(quantized, reference, ids)
    assert _rel(a, b) < REL and clear > 15 and agree == clear
    assert _param_bytes(quantized.model) < _param_bytes(reference.model) / 3


def test_dtype_options_are_validated(decoders, tmp_path):
    folder = decoders("llama3")
    for bad in ["int2", "INT9", 8, "quantized"]:  # "quantized" is a GGUF file's own format only
        with pytest.raises(UnsupportedModelOption, match="dtype"):
            ModelSource("m", str(folder), bad)
    with pytest.raises(UnsupportedModelOption, match="dtype"):
        ModelSource.parse("m", {"path": str(tmp_path / "x.gguf"), "dtype": "q4"})
    with pytest.raises(Exception, match="unknown key"):
        ModelSource.parse("m", {"path": str(folder), "dtype": "int8", "quant": 4})
    assert ModelSource("m", str(tmp_path / "x.gguf"), "quantized").quantization == "gguf"
    assert ModelSource("m", str(tmp_path / "x.gguf")).quantization == "gguf"
    assert ModelSource("m", str(tmp_path / "x.gguf"), "float32").quantization is None
    assert ModelSource("m", str(folder), "INT8").quantization == "int8"


def test_int8_on_a_family_without_quantized_weights_is_a_typed_error(tmp_path):
    from .tiny import make_bert

    folder = make_bert(tmp_path / "bert")
    with pytest.raises(UnsupportedModelOption, match="dtype 'int8'"):
        _load(folder, "int8")
    json.loads((folder / "config.json").read_text())  # the folder is untouched
