"""Decoder families (Llama 3.x, Mistral with its sliding window, Qwen2, Qwen3, Gemma 2, Gemma 3,
Phi-3) against transformers on tiny random models, their GGUF files against the dequantised
folders, chat templates from the files, and typed errors for what is not supported."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from edgecompute_ml.errors import (  # noqa: E402
    InvalidModelConfig,
    ModelError,
    UnsupportedArchitecture,
    UnsupportedModelOption,
)
from edgecompute_ml.generation import GenerationParams, build_prompt_ids, generate  # noqa: E402
from edgecompute_ml.store import ModelSource, inspect_model, load_model  # noqa: E402

from .tiny_families import SPECS, make_decoder  # noqa: E402

# long enough to cross every sliding window (4 and 6 tokens)
PROMPTS = ["the quick brown fox jumps over the lazy dog", "Paris is the capital of France and Berlin",
           "hello world, how are you today? 0123"]
FAMILIES = sorted(SPECS)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory):
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = make_decoder(tmp_path_factory.mktemp(name), name)
        return made[name]

    return get


def _load(folder, dtype="float32"):
    return load_model(inspect_model(ModelSource("m", str(folder))), dtype, "cpu")


def _reference(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_match_transformers(folders, name):
    folder = folders(name)
    lm = _load(folder)
    assert lm.family == {"llama3": "llama", "mistral_swa": "llama"}.get(name, name)
    ref = _reference(folder)
    for prompt in PROMPTS:
        ids = lm.tokenizer.encode(prompt).ids
        assert len(ids) > 6  # past every sliding window
        with torch.no_grad():
            expected = ref(torch.tensor([ids])).logits[0]
        got = lm.model.forward(torch.tensor([ids]), lm.model.new_cache(40), last_only=False)[0]
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)
        # token by token through the KV cache (the window slides over cached keys), then a chunk
        # at an offset (a sliding mask over cached and new keys)
        cache = lm.model.new_cache(40)
        steps = [lm.model.forward(torch.tensor([[t]]), cache)[0] for t in ids[:6]]
        rest = lm.model.forward(torch.tensor([ids[6:]]), cache, last_only=False)[0]
        torch.testing.assert_close(torch.cat([torch.stack(steps), rest]), expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_tokens_identical_to_transformers_generate(folders, name):
    folder = folders(name)
    lm = _load(folder)
    lm.eos_token_ids = frozenset()
    ref = _reference(folder)
    seen: set[int] = set()
    for prompt in PROMPTS[:2]:
        ids = build_prompt_ids(lm, prompt)
        ours = generate(lm, ids, GenerationParams(max_new_tokens=20))["tokens"]
        with torch.no_grad():
            theirs = ref.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)[0, len(ids):].tolist()
        assert ours == theirs
        seen.update(ours)
    assert len(seen) > 4  # not a degenerate repetition that any model would produce


def test_phi3_longrope_switches_to_long_factors_past_the_original_context(folders):
    """Past original_max_position_embeddings (64 here) transformers rotates with the long
    factors; a KV cache that large does the same."""
    folder = folders("phi3")
    lm = _load(folder)
    ids = lm.tokenizer.encode(" ".join(PROMPTS * 2)).ids
    assert len(ids) > 64
    with torch.no_grad():
        expected = _reference(folder)(torch.tensor([ids])).logits[0]
    got = lm.model.forward(torch.tensor([ids]), lm.model.new_cache(len(ids)), last_only=False)[0]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)
    short = lm.model.forward(torch.tensor([ids[:40]]), lm.model.new_cache(40), last_only=False)[0]
    assert not torch.allclose(short, got[:40], atol=1e-3)  # the factors really differ


def test_llama3_rope_scaling_changes_the_model(folders, tmp_path):
    """Dropping the llama3 scaling from the config changes the logits: the scaling is applied."""
    folder = folders("llama3")
    plain = tmp_path / "plain"
    shutil.copytree(folder, plain)
    config = json.loads((plain / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": config["rope_parameters"]["rope_theta"]}
    (plain / "config.json").write_text(json.dumps(config))
    ids = torch.tensor([_load(folder).tokenizer.encode(PROMPTS[0]).ids])
    a, b = _load(folder), _load(plain)
    assert not torch.allclose(a.model.forward(ids, a.model.new_cache(40)), b.model.forward(ids, b.model.new_cache(40)),
                              atol=1e-3)


def test_hub_style_configs_read_as_transformers_5_writes_them(folders, tmp_path):
    """config.json files on model hubs mostly predate transformers 5: rope_theta at the top,
    rope_scaling, Gemma 3's rope_local_base_freq and sliding_window_pattern, no layer_types."""
    for name, rewrite in [
        ("llama3", lambda c: {**{k: v for k, v in c.items() if k != "rope_parameters"},
                              "rope_theta": c["rope_parameters"]["rope_theta"],
                              "rope_scaling": {k: v for k, v in c["rope_parameters"].items() if k != "rope_theta"}}),
        ("gemma3", lambda c: {**{k: v for k, v in c.items() if k not in ("rope_parameters", "layer_types")},
                              "rope_theta": 1e6, "rope_local_base_freq": 10000.0, "sliding_window_pattern": 2,
                              "rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
        ("gemma2", lambda c: {k: v for k, v in c.items() if k != "layer_types"}),
    ]:
        folder = folders(name)
        old = tmp_path / name
        shutil.copytree(folder, old)
        (old / "config.json").write_text(json.dumps(rewrite(json.loads((folder / "config.json").read_text()))))
        a, b = _load(folder), _load(old)
        ids = torch.tensor([a.tokenizer.encode(PROMPTS[0]).ids])
        torch.testing.assert_close(b.model.forward(ids, b.model.new_cache(40), last_only=False),
                                   a.model.forward(ids, a.model.new_cache(40), last_only=False), atol=0, rtol=0)


@pytest.mark.parametrize("name", ["gemma2", "qwen3"])
def test_half_precision_stays_close_to_float32(folders, name):
    full, half = _load(folders(name)), _load(folders(name), "bfloat16")
    ids = torch.tensor([full.tokenizer.encode(PROMPTS[0]).ids])
    expected = full.model.forward(ids, full.model.new_cache(40))
    got = half.model.forward(ids, half.model.new_cache(40))
    assert (got - expected).abs().max() < 0.1 * expected.abs().max()


def _with_config(folder: Path, out: Path, change) -> Path:
    shutil.copytree(folder, out)
    config = json.loads((out / "config.json").read_text())
    change(config)
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize(("name", "change", "option", "value"), [
    ("llama3", lambda c: c["rope_parameters"].update(rope_type="yarn"), "rope_parameters.rope_type", "yarn"),
    ("qwen2", lambda c: c["rope_parameters"].update(rope_type="dynamic"), "rope_parameters.rope_type", "dynamic"),
    ("gemma3", lambda c: c["layer_types"].__setitem__(1, "chunked_attention"), "layer_types", "chunked_attention"),
    ("gemma3", lambda c: c.update(use_bidirectional_attention=True), "use_bidirectional_attention", True),
    ("qwen3", lambda c: c.update(hidden_act="relu2"), "hidden_act", "relu2"),
])
def test_unsupported_options_are_typed_errors_naming_them(folders, tmp_path, name, change, option, value):
    folder = _with_config(folders(name), tmp_path / "m", change)
    with pytest.raises(UnsupportedModelOption) as info:
        inspect_model(ModelSource("m", str(folder)))
    assert info.value.option == option and info.value.value == value
    assert repr(value) in str(info.value) and "supported:" in str(info.value)


def test_multimodal_gemma3_is_an_unsupported_architecture(folders, tmp_path):
    folder = _with_config(folders("gemma3"), tmp_path / "m",
                          lambda c: c.update(model_type="gemma3", architectures=["Gemma3ForConditionalGeneration"]))
    with pytest.raises(UnsupportedArchitecture, match="Gemma3ForConditionalGeneration.*Gemma3ForCausalLM"):
        inspect_model(ModelSource("m", str(folder)))


@pytest.mark.parametrize(("change", "key"), [
    (lambda c: c["rope_parameters"].update(factor=float("inf")), "rope_parameters.factor"),
    (lambda c: c["rope_parameters"].update(high_freq_factor=0.5), "rope_parameters.high_freq_factor"),
    (lambda c: c.update(sliding_window=0), "sliding_window"),
    (lambda c: c.update(layer_types=["full_attention"]), "layer_types"),
    (lambda c: c.update(final_logit_softcapping="30"), "final_logit_softcapping"),
])
def test_bad_family_keys_are_typed_errors_naming_them(folders, tmp_path, change, key):
    folder = _with_config(folders("llama3"), tmp_path / "m", change)
    with pytest.raises(InvalidModelConfig) as info:
        inspect_model(ModelSource("m", str(folder)))
    assert info.value.key == key


def test_longrope_factor_lists_must_cover_the_rotary_dimension(folders, tmp_path):
    folder = _with_config(folders("phi3"), tmp_path / "m", lambda c: c["rope_parameters"].update(short_factor=[1.0]))
    with pytest.raises(ModelError, match="short_factor and long_factor need 6 values"):
        inspect_model(ModelSource("m", str(folder)))
