"""GGUF: dequantisation against the reference implementation, Llama models and their tokenizer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from edgecompute_ml._formats.gguf import GGUFFile, convert_gguf_to_folder, dequantize  # noqa: E402
from edgecompute_ml._runtime.plan import ModelSource  # noqa: E402
from edgecompute_ml._runtime.store import inspect_model, load_model  # noqa: E402
from edgecompute_ml.errors import ModelError  # noqa: E402

Q = gguf.GGMLQuantizationType


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "F16", "BF16"])
def test_dequantise_matches_gguf_reference(qtype):
    rng = np.random.default_rng(0)
    data = rng.normal(size=(8, 64)).astype(np.float32)
    packed = gguf.quants.quantize(data, Q[qtype])
    expected = gguf.quants.dequantize(packed, Q[qtype])
    got = dequantize(packed.reshape(-1).view(np.uint8), int(Q[qtype]), (8, 64))
    np.testing.assert_array_equal(got, expected)
    if qtype.startswith("Q"):
        assert np.abs(got - data).max() < 0.5  # it really is a quantisation of the data


@pytest.mark.parametrize(("qtype", "size", "scale_bytes"), [("Q6_K", 210, [(208, 210)]),
                                                            ("Q4_K", 144, [(0, 2), (2, 4)]),
                                                            ("Q5_K", 176, [(0, 2), (2, 4)])])
def test_k_quants_match_gguf_reference(qtype, size, scale_bytes):
    rng = np.random.default_rng(1)
    blocks = rng.integers(0, 256, size=(4, size), dtype=np.uint8)
    for lo, hi in scale_bytes:  # finite, modest f16 super-block scales
        blocks[:, lo:hi] = np.frombuffer(np.float16(rng.uniform(0.01, 0.1, 4)).tobytes(), np.uint8).reshape(4, 2)
    expected = gguf.quants.dequantize(blocks, Q[qtype]).reshape(-1)
    got = dequantize(blocks.reshape(-1), int(Q[qtype]), (4 * 256,))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # what llama.cpp's converter does to q/k rows
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(folder, path, qtype: str = "F32"):
    """Write an HF tiny Llama folder as a llama.cpp-style GGUF (tokenizer in the metadata)."""
    from safetensors.numpy import load_file

    config = json.loads((folder / "config.json").read_text())
    weights = load_file(str(folder / "model.safetensors"))
    tk = json.loads((folder / "tokenizer.json").read_text())
    tc = json.loads((folder / "tokenizer_config.json").read_text())
    w = gguf.GGUFWriter(str(path), "llama")
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_block_count(config["num_hidden_layers"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_key_length(config["head_dim"])
    w.add_value_length(config["head_dim"])
    w.add_rope_dimension_count(config["head_dim"])
    w.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    vocab = sorted(tk["model"]["vocab"].items(), key=lambda kv_: kv_[1])
    specials = {t["content"] for t in tk["added_tokens"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t in specials else 1 for t, _ in vocab])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tk["model"]["merges"]])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(tc["chat_template"])
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    parts = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    dequantised = {}
    for name, value in weights.items():
        value = value.astype(np.float32)
        if name in names:
            gname = names[name]
        else:
            _, _, layer, *rest = name.split(".")
            gname = f"blk.{layer}.{parts['.'.join(rest[:-1])]}.weight"
        if name.endswith("q_proj.weight"):
            value = _permute(value, heads)
        elif name.endswith("k_proj.weight"):
            value = _permute(value, kv)
        if qtype != "F32" and value.ndim == 2:
            packed = gguf.quants.quantize(value, Q[qtype])
            w.add_tensor(gname, packed, raw_dtype=Q[qtype])
            dequantised[name] = gguf.quants.dequantize(packed, Q[qtype])
        else:
            w.add_tensor(gname, value)
            dequantised[name] = value
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dequantised


@pytest.fixture(scope="module")
def tiny_gguf(tiny_llama, tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf"
    write_gguf(tiny_llama, path)
    return path


def test_gguf_llama_matches_the_safetensors_model(tiny_llama, tiny_gguf):
    assert not (tiny_gguf.parent / "tokenizer.json").exists()
    ours = load_model(inspect_model(ModelSource("g", str(tiny_gguf))), "float32", "cpu")
    ref = load_model(inspect_model(ModelSource("s", str(tiny_llama))), "float32", "cpu")
    for text in ["the quick brown fox", "hello world, how are you today? 0123"]:
        ids = ref.tokenizer.encode(text).ids
        assert ours.tokenizer.encode(text).ids == ids  # tokenizer rebuilt from GGUF metadata
        assert ours.tokenizer.decode(ids) == ref.tokenizer.decode(ids)
        torch.testing.assert_close(
            ours.model.forward(torch.tensor([ids]), ours.model.new_cache(64), last_only=False),
            ref.model.forward(torch.tensor([ids]), ref.model.new_cache(64), last_only=False), atol=1e-5, rtol=0)
    assert ours.chat_template and 2 in ours.eos_token_ids


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1"])
def test_quantised_gguf_equals_transformers_on_the_dequantised_weights(tiny_llama, tmp_path, qtype):
    path = tmp_path / f"tiny-{qtype}.gguf"
    dequantised = write_gguf(tiny_llama, path, qtype)
    # dequantised at load (the float path; tests/ml/test_quant.py checks the packed one against it)
    ours = load_model(inspect_model(ModelSource("g", str(path), "float32")), "float32", "cpu")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    heads = ref.config.num_attention_heads
    kv = ref.config.num_key_value_heads
    state = {}
    for name, value in dequantised.items():
        if name.endswith("q_proj.weight"):  # undo the permutation for the HF layout
            value = value.reshape(heads, value.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(value.shape)
        elif name.endswith("k_proj.weight"):
            value = value.reshape(kv, value.shape[0] // kv // 2, 2, -1).swapaxes(1, 2).reshape(value.shape)
        state[name] = torch.from_numpy(np.ascontiguousarray(value))
    ref.load_state_dict(state, strict=False)
    ids = ours.tokenizer.encode("the quick brown fox").ids
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(ours.model.forward(torch.tensor([ids]), ours.model.new_cache(32), last_only=False)[0],
                               expected, atol=1e-4, rtol=0)


def test_converted_folder_loads_in_transformers_and_here(tiny_gguf, tiny_llama, tmp_path):
    out = convert_gguf_to_folder(tiny_gguf, tmp_path / "converted")
    ours = load_model(inspect_model(ModelSource("c", str(out))), "float32", "cpu")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = ours.tokenizer.encode("hello world").ids
    with torch.no_grad():
        torch.testing.assert_close(back(torch.tensor([ids])).logits, ref(torch.tensor([ids])).logits,
                                   atol=1e-5, rtol=0)


def test_broken_gguf_files_are_rejected(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"GGML" + b"\0" * 64)
    with pytest.raises(ModelError, match="not a GGUF file"):
        GGUFFile(path)
    path.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (5).to_bytes(8, "little"))
    with pytest.raises(ModelError, match="truncated"):
        GGUFFile(path)
