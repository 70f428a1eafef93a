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

from edgecompute_ml._runtime.plan import ModelSource  # noqa: E402
from edgecompute_ml._runtime.store import inspect_model, load_model  # noqa: E402
from edgecompute_ml._tasks.generation import GenerationParams, build_prompt_ids, generate, render_chat  # noqa: E402
from edgecompute_ml.errors import (  # noqa: E402
    InvalidModelConfig,
    InvalidRequest,
    ModelError,
    UnsupportedArchitecture,
    UnsupportedModelOption,
)

from .tiny_families import GGUF_ARCH, SPECS, dequantised_folder, make_decoder, write_family_gguf  # noqa: E402

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


def _load(folder, dtype="float32", weights=None):
    return load_model(inspect_model(ModelSource("m", str(folder), weights)), dtype, "cpu")


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


# -- GGUF --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0"])
@pytest.mark.parametrize("name", sorted(GGUF_ARCH))
def test_gguf_equals_the_dequantised_folder(folders, tmp_path, name, qtype):
    """A GGUF file written as llama.cpp writes it (its tensor names from the gguf package, q/k
    rows permuted for llama, Gemma norms stored as 1 + w, llama3 scaling as rope_freqs, longrope
    as factor tensors, fused Phi-3 tensors) runs as the folder of the weights it holds."""
    folder = folders(name)
    path = tmp_path / f"{name}-{qtype}.gguf"
    weights = write_family_gguf(folder, path, qtype)
    reference = dequantised_folder(folder, weights, tmp_path / "ref")
    # dequantised at load ("float32"): the quantized path is tests/ml/test_quant.py's
    ours, ref = _load(path, weights="float32"), _load(reference)
    assert ours.family == ref.family and ours.chat_template == ref.chat_template
    for prompt in PROMPTS[:2]:
        ids = ref.tokenizer.encode(prompt).ids
        assert ours.tokenizer.encode(prompt).ids == ids  # the tokenizer rebuilt from the metadata
        torch.testing.assert_close(
            ours.model.forward(torch.tensor([ids]), ours.model.new_cache(40), last_only=False),
            ref.model.forward(torch.tensor([ids]), ref.model.new_cache(40), last_only=False), atol=1e-4, rtol=1e-5)
    ours.eos_token_ids = ref.eos_token_ids = frozenset()
    ids = build_prompt_ids(ref, PROMPTS[0])
    params = GenerationParams(max_new_tokens=12)
    assert generate(ours, ids, params)["tokens"] == generate(ref, ids, params)["tokens"]


def test_gguf_of_the_float_weights_matches_transformers(folders, tmp_path):
    """End to end for one family with every trait at once (Gemma 3: q/k norms, 1 + w norms,
    sliding layers, two rotary tables, linear scaling): GGUF against transformers itself."""
    folder = folders("gemma3")
    path = tmp_path / "g.gguf"
    write_family_gguf(folder, path)
    ours = _load(path)
    ids = ours.tokenizer.encode(PROMPTS[0]).ids
    with torch.no_grad():
        expected = _reference(folder)(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(ours.model.forward(torch.tensor([ids]), ours.model.new_cache(40), last_only=False)[0],
                               expected, atol=1e-4, rtol=1e-5)


def test_gguf_types_we_do_not_dequantise_go_through_the_gguf_package():
    """Q6_K (faster there) and types without code of ours (Q2_K, Q3_K, IQ4_NL) dequantise as
    llama.cpp's gguf-py does."""
    import gguf
    import numpy as np

    from edgecompute_ml._formats.gguf import dequantize, type_info

    rng = np.random.default_rng(0)
    for qtype in ("Q6_K", "Q2_K", "Q3_K", "IQ4_NL"):
        q = gguf.GGMLQuantizationType[qtype]
        name, block, size = type_info(int(q))
        assert name == qtype
        blocks = rng.integers(0, 256, size=(4, 512 // block * size), dtype=np.uint8)
        with np.errstate(all="ignore"):  # random bytes make some f16 scales inf or NaN
            expected = gguf.quants.dequantize(blocks, q)
            got = dequantize(blocks.reshape(-1), int(q), (4, 512))
        np.testing.assert_array_equal(got, expected.reshape(4, 512))
        assert np.isfinite(got).mean() > 0.5


def test_llama3_gguf_tokenizer_splits_digits_as_llama3(folders, tmp_path):
    """``tokenizer.ggml.pre = llama-bpe`` pre-tokenizes as Llama 3's tokenizer.json (digits in
    threes), which GPT-2's byte-level regex does not."""
    from tokenizers import Regex, Tokenizer, pre_tokenizers

    from edgecompute_ml._formats.gguf import GGUFFile, gguf_tokenizer

    folder = tmp_path / "llama3"
    shutil.copytree(folders("llama3"), folder)
    tk = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                                   r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
                             behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.save(str(folder / "tokenizer.json"))
    path = tmp_path / "l.gguf"
    write_family_gguf(folder, path)
    g = GGUFFile(path)
    g.metadata["tokenizer.ggml.pre"] = "llama-bpe"
    text = "call 0123456789 now, 42 times!"
    assert gguf_tokenizer(g).encode(text).ids == tk.encode(text).ids
    g.metadata["tokenizer.ggml.pre"] = "default"
    assert gguf_tokenizer(g).encode(text).ids != tk.encode(text).ids


def test_unsupported_gguf_architecture_and_tokenizer_are_typed_errors(folders, tmp_path):
    from edgecompute_ml._formats.gguf import GGUFFile, gguf_config, gguf_tokenizer

    path = tmp_path / "q.gguf"
    write_family_gguf(folders("qwen3"), path)
    g = GGUFFile(path)
    g.metadata["general.architecture"] = "mamba"
    with pytest.raises(UnsupportedArchitecture, match="'mamba'.*gemma3 \\(GGUF\\)"):
        gguf_config(g)
    g.metadata["general.architecture"] = "qwen3"
    g.metadata["qwen3.rope.scaling.type"] = "yarn"
    with pytest.raises(UnsupportedModelOption, match="qwen3.rope.scaling.type 'yarn'"):
        gguf_config(g)
    g.metadata["tokenizer.ggml.model"] = "llama"
    with pytest.raises(UnsupportedModelOption, match="tokenizer.ggml.model 'llama'.*tokenizer.json"):
        gguf_tokenizer(g)


# -- chat templates ------------------------------------------------------------------------------------

# the shapes of the families' own templates: what they use of jinja2 and of transformers' globals
TEMPLATES = {
    "llama3": (
        "{{- bos_token }}{%- if not tools is defined %}{%- set tools = none %}{%- endif %}"
        "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}"
        "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
        "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
        "{%- if tools is not none %}{{- 'Tools: ' + tools|tojson }}{%- endif %}"
        "{{- 'Today Date: ' + strftime_now('%Y') [:0] + '26 Jul 2024\\n\\n' }}"
        "{{- system_message }}{{- '<|eot_id|>' }}"
        "{%- for message in messages %}"
        "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
        " + '<|eot_id|>' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"),
    "qwen3": (
        "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}"
        "{%- for message in messages[::-1] %}{%- set index = (messages|length - 1) - loop.index0 %}"
        "{%- if ns.multi_step_tool and message.role == 'user' and not message.content.startswith('<tool_response>')"
        " %}{%- set ns.multi_step_tool = false %}{%- set ns.last_query_index = index %}{%- endif %}{%- endfor %}"
        "{%- for message in messages %}{%- set content = message.content %}"
        "{%- if message.role == 'assistant' and '</think>' in content %}"
        "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
        "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
        "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
        "{%- endif %}{%- endif %}"),
    "gemma": (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
        "{% set first_user_prefix = messages[0]['content'] + '\\n\\n' %}{% set loop_messages = messages[1:] %}"
        "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
        "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
        "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
        "{% generation %}{{ message['content'] | trim }}{% endgeneration %}{{ '<end_of_turn>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"),
    "phi3": (
        "{% for message in messages %}{% if message['role'] == 'system' %}"
        "{{'<|system|>\\n' + message['content'] + '<|end|>\\n'}}{% elif message['role'] == 'user' %}"
        "{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}{% elif message['role'] == 'assistant' %}"
        "{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"),
}
MESSAGES = [{"role": "system", "content": "You are terse. <b>&</b>"},
            {"role": "user", "content": "What is 2+2? "},
            {"role": "assistant", "content": "<think>\nadd</think>\n\n4"},
            {"role": "user", "content": "And 3+3?"}]


@pytest.mark.parametrize("family", sorted(TEMPLATES))
def test_chat_templates_from_the_files_render_as_transformers(folders, tmp_path, family):
    """The template comes from tokenizer_config.json (and, for a GGUF file, from
    tokenizer.chat_template) and renders the text transformers' apply_chat_template renders."""
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path / family
    shutil.copytree(folders("qwen3"), folder)
    tc = json.loads((folder / "tokenizer_config.json").read_text())
    tc["chat_template"] = TEMPLATES[family]
    (folder / "tokenizer_config.json").write_text(json.dumps(tc))
    lm = _load(folder)
    ids = build_prompt_ids(lm, {"messages": MESSAGES})
    theirs = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), bos_token="<s>", eos_token="</s>",
                                     chat_template=TEMPLATES[family])
    text = theirs.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert render_chat(lm.chat_template, MESSAGES, lm.tokenizer_config) == text
    assert ids == lm.tokenizer.encode(text, add_special_tokens=False).ids
    assert "And 3+3?" in text and "<b>&</b>" in text
    path = tmp_path / "m.gguf"
    write_family_gguf(folder, path)
    assert _load(path).chat_template == TEMPLATES[family]


def test_template_exceptions_and_escapes_are_invalid_requests():
    with pytest.raises(InvalidRequest, match="roles must alternate"):
        render_chat(TEMPLATES["gemma"], [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], {})
    for hostile in ["{{ ''.__class__.__mro__[1].__subclasses__() }}",
                    "{{ messages.__class__ }}{{ cycler.__init__.__globals__ }}",
                    "{% set ns = namespace() %}{% set ns._x = 1 %}",
                    "{{ messages.append(1) }}",
                    "{% set _ = messages[0].update(role='x') %}",
                    # bounded: what a template builds cannot take the host's memory
                    "{{ 'a' * 10**9 }}", "{{ [0] * 10**9 }}", "{{ 7 ** 1000000 }}", "{{ 'x'|center(10**9) }}",
                    "{{ 'x'.ljust(10**9) }}", "{{ '{:>999999999}'.format(1) }}", "{{ '%999999999s' % 1 }}",
                    "{{ messages|tojson(indent=10**9) }}",
                    "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
                    "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
                    "{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}",
                    # any failure inside a template is the request's typed error, not a crash
                    "{{ 1 / 0 }}", "{{ messages[0].content + 1 }}", "{{ messages|tojson(indent=-1) }}"]:
        messages = [{"role": "user", "content": "hi"}]
        with pytest.raises(InvalidRequest):
            render_chat(hostile, messages, {})
        assert messages == [{"role": "user", "content": "hi"}]
    # escapes that jinja2's sandbox answers with an undefined value render nothing of the host
    for quiet in ["{{ cycler.__init__ }}", "{{ ''.format.__globals__ }}", "{{ messages|attr('__class__') }}",
                  "{{ '{0.__class__}'.format(messages) }}", "{{ raise_exception.__globals__ }}"]:
        assert render_chat(quiet, [{"role": "user", "content": "hi"}], {}) == ""
    # and within the bounds the operators still work as jinja2's
    assert render_chat("{{ 'ab' ~ 3 }}{{ 'x' * 3 }}{{ 2 ** 10 }}{{ [1] + [2] }}{{ '%3s'|format('a') }}",
                       [{"role": "user", "content": "hi"}], {}) == "ab3xxx1024[1, 2]  a"
