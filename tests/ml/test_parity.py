"""Our torch implementations against transformers on tiny random models (f32)."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from edgecompute_ml._runtime.plan import ModelSource  # noqa: E402
from edgecompute_ml._runtime.store import inspect_model, load_model  # noqa: E402
from edgecompute_ml._tasks.embeddings import embed_texts  # noqa: E402
from edgecompute_ml._tasks.generation import GenerationParams, build_prompt_ids, generate  # noqa: E402

PROMPTS = ["the quick brown fox", "Paris is the capital of", "hello world, how are you today?"]


def _load(folder, dtype="float32"):
    return load_model(inspect_model(ModelSource("m", str(folder))), dtype, "cpu")


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_mistral", "tiny_llama_sharded"])
def test_decoder_logits_match_transformers(fixture, request):
    folder = request.getfixturevalue(fixture)
    lm = _load(folder)
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for prompt in PROMPTS:
        ids = lm.tokenizer.encode(prompt).ids
        with torch.no_grad():
            expected = ref(torch.tensor([ids])).logits[0]
        # prefill, all positions
        got = lm.model.forward(torch.tensor([ids]), lm.model.new_cache(64), last_only=False)[0]
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
        # one token at a time through the KV cache, then a chunk at an offset
        cache = lm.model.new_cache(64)
        steps = [lm.model.forward(torch.tensor([[t]]), cache)[0] for t in ids[:2]]
        rest = lm.model.forward(torch.tensor([ids[2:]]), cache, last_only=False)[0]
        torch.testing.assert_close(torch.cat([torch.stack(steps), rest]), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_mistral"])
def test_greedy_tokens_identical_to_transformers_generate(fixture, request):
    folder = request.getfixturevalue(fixture)
    lm = _load(folder)
    lm.eos_token_ids = frozenset()  # run the full length on both sides
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for prompt in PROMPTS:
        ids = build_prompt_ids(lm, prompt)
        ours = generate(lm, ids, GenerationParams(max_new_tokens=24))["tokens"]
        with torch.no_grad():
            theirs = ref.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
        assert ours == theirs


def test_repetition_penalty_matches_transformers(tiny_llama):
    lm = _load(tiny_llama)
    lm.eos_token_ids = frozenset()
    ref = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    ids = build_prompt_ids(lm, "the quick brown fox")
    ours = generate(lm, ids, GenerationParams(max_new_tokens=20, repetition_penalty=1.5))["tokens"]
    with torch.no_grad():
        theirs = ref.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, repetition_penalty=1.5,
                              eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    assert ours == theirs


def test_encoder_embeddings_match_transformers(tiny_bert):
    lm = _load(tiny_bert)
    ref = transformers.AutoModel.from_pretrained(tiny_bert).eval()
    texts = ["hello world", "the quick brown fox jumps over the lazy dog", "Paris"]
    got = embed_texts(lm, texts)  # one padded batch
    for text, vector in zip(texts, got, strict=True):
        enc = lm.tokenizer.encode(text)
        with torch.no_grad():
            hidden = ref(torch.tensor([enc.ids]), token_type_ids=torch.tensor([enc.type_ids])).last_hidden_state[0]
        torch.testing.assert_close(vector, hidden.mean(0), atol=1e-4, rtol=0)


def test_config_traps_are_read(tiny_llama):
    raw = json.loads((tiny_llama / "config.json").read_text())
    assert "rope_theta" not in raw and raw["rope_parameters"]["rope_theta"] == 50000.0
    assert raw["head_dim"] * raw["num_attention_heads"] != raw["hidden_size"]
    config = inspect_model(ModelSource("m", str(tiny_llama))).config
    assert config.rope_theta == 50000.0
    assert config.head_dim == 24


def test_half_precision_checkpoints_convert_at_load(tmp_path):
    from .tiny import make_llama

    folder = make_llama(tmp_path / "bf16", dtype="bfloat16")
    header = json.loads((folder / "config.json").read_text())
    assert header.get("dtype", header.get("torch_dtype")) == "bfloat16"
    lm = _load(folder, "float32")
    assert lm.model.embed.dtype == torch.float32
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = lm.tokenizer.encode("the quick brown fox").ids
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0, -1]
    torch.testing.assert_close(lm.model.forward(torch.tensor([ids]), lm.model.new_cache(32))[0], expected,
                               atol=1e-4, rtol=0)
    half = _load(folder, "float16")
    assert half.model.embed.dtype == torch.float16


def test_sharded_checkpoint_equals_single_file(tiny_llama, tiny_llama_sharded):
    assert (tiny_llama_sharded / "model.safetensors.index.json").is_file()
    assert len(list(tiny_llama_sharded.glob("model-*.safetensors"))) > 1
    a, b = _load(tiny_llama), _load(tiny_llama_sharded)

    def weights(lm):
        return [lm.model.embed, lm.model.norm, lm.model.lm_head] + [
            getattr(layer, name) for layer in lm.model.layers for name in type(layer).__slots__]

    for x, y in zip(weights(a), weights(b), strict=True):  # the same tensors, bit for bit
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y)
    ids = a.tokenizer.encode("hello world").ids
    # Not bit-identical outputs: where a tensor lies in memory (its alignment differs between the
    # two files) can pick another vector kernel, which sums in another order (seen with AVX-512).
    torch.testing.assert_close(a.model.forward(torch.tensor([ids]), a.model.new_cache(32)),
                               b.model.forward(torch.tensor([ids]), b.model.new_cache(32)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_inference_stays_close_to_float32(tiny_llama, tiny_bert, dtype):
    full, half = _load(tiny_llama), _load(tiny_llama, dtype)
    ids = full.tokenizer.encode("the quick brown fox").ids
    expected = full.model.forward(torch.tensor([ids]), full.model.new_cache(32))
    got = half.model.forward(torch.tensor([ids]), half.model.new_cache(32))
    assert got.dtype == torch.float32
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()
    full_b, half_b = _load(tiny_bert), _load(tiny_bert, dtype)
    a, b = embed_texts(full_b, ["hello world"]), embed_texts(half_b, ["hello world"])
    assert torch.nn.functional.cosine_similarity(a, b).item() > 0.99
