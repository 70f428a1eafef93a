"""Tiny random models built by the tests (nothing is downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "Paris is the capital of France and Berlin is the capital of Germany",
    "hello world, how are you today? I am fine, thank you.",
    "numbers 0123456789 and symbols !@#$%^&*() are here",
    "système über naïve café — unicode text ✓",
]
SPECIAL = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def byte_level_tokenizer(vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(CORPUS * 3, trainer)
    return tk


def make_llama(folder: Path, *, shards: bool = False, head_dim: int | None = 24, mistral: bool = False,
               tie: bool = True, seed: int = 0, dtype: str = "float32") -> Path:
    """A tiny Llama (or Mistral) with GQA, head_dim != hidden/heads and rope_theta written only
    under rope_parameters, saved the way transformers saves it."""
    import torch
    import transformers

    tk = byte_level_tokenizer()
    torch.manual_seed(seed)
    kwargs = dict(vocab_size=tk.get_vocab_size(), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-5, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2,
                  rope_parameters={"rope_type": "default", "rope_theta": 50000.0})
    if head_dim is not None:
        kwargs["head_dim"] = head_dim
    if mistral:
        config = transformers.MistralConfig(**kwargs, sliding_window=None)
        model = transformers.MistralForCausalLM(config)
    else:
        config = transformers.LlamaConfig(**kwargs)
        model = transformers.LlamaForCausalLM(config)
    model = model.to(getattr(torch, dtype)).eval()
    # larger random weights than the default init, so that logits differ enough to test greedy
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    model.save_pretrained(folder, max_shard_size="40KB" if shards else "5GB")
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "chat_template": CHAT_TEMPLATE, "model_max_length": 256}))
    return folder


def bert_tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    words = sorted({w for line in CORPUS for w in line.lower().replace(",", " , ").split()})
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words,
              *[f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz0123456789"],
              *list("abcdefghijklmnopqrstuvwxyz0123456789.,!?")]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    tk = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tk.normalizer = normalizers.BertNormalizer(lowercase=True)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return tk


def make_bert(folder: Path, *, seed: int = 0, normalize: bool = True) -> Path:
    import torch
    import transformers

    tk = bert_tokenizer()
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=tk.get_vocab_size(), hidden_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=96, max_position_embeddings=64)
    model = transformers.BertModel(config).eval()
    model.save_pretrained(folder)
    tk.enable_padding(length=32, pad_id=0, pad_token="[PAD]")  # as all-MiniLM-L6-v2's tokenizer.json has
    tk.enable_truncation(32)
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    return folder


WHISPER_SPECIAL_EN = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|translate|>", "<|transcribe|>",
                      "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>"]
WHISPER_SPECIAL_MULTI = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|de|>", "<|fr|>", "<|translate|>",
                         "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>"]


def make_whisper(folder: Path, *, multilingual: bool = False, seed: int = 0, scale: float = 0.15,
                 null_suppress: bool = False) -> Path:
    """A tiny random Whisper with Whisper's special-token layout (text, specials, then 1501
    timestamps), saved by transformers, with a generation_config.json as the real ones have."""
    import torch
    import transformers
    from tokenizers import AddedToken

    tk = byte_level_tokenizer()
    base = tk.get_vocab_size()
    specials = WHISPER_SPECIAL_MULTI if multilingual else WHISPER_SPECIAL_EN
    tk.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    ids = {s: tk.token_to_id(s) for s in specials}
    assert ids["<|endoftext|>"] == base
    vocab = base + len(specials) + 1501
    eot, sot, no_ts = ids["<|endoftext|>"], ids["<|startoftranscript|>"], ids["<|notimestamps|>"]
    torch.manual_seed(seed)
    config = transformers.WhisperConfig(
        vocab_size=vocab, num_mel_bins=80, d_model=64, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
        max_source_positions=1500, max_target_positions=96, decoder_start_token_id=sot, eos_token_id=eot,
        pad_token_id=eot, bos_token_id=eot)
    model = transformers.WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():  # larger than the default init, so that greedy choices are well separated
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, scale)
    model.save_pretrained(folder)
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 96, "eos_token": "<|endoftext|>"}))
    suppress = [1, 2, 5, 7] + [ids[s] for s in specials if s not in ("<|endoftext|>", "<|notimestamps|>")
                               and not (multilingual and s in ("<|en|>", "<|de|>", "<|fr|>"))]
    gen = {"decoder_start_token_id": sot, "eos_token_id": eot, "pad_token_id": eot, "bos_token_id": eot,
           "suppress_tokens": None if null_suppress else suppress, "begin_suppress_tokens": [eot],
           "no_timestamps_token_id": no_ts, "max_initial_timestamp_index": 50, "max_length": 96,
           "is_multilingual": multilingual}
    if multilingual:
        gen["lang_to_id"] = {s: ids[s] for s in ("<|en|>", "<|de|>", "<|fr|>")}
        gen["task_to_id"] = {"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]}
    else:
        gen["forced_decoder_ids"] = [[1, no_ts]]
    (folder / "generation_config.json").write_text(json.dumps(gen))
    return folder


def write_ctranslate2_whisper(hf_folder: Path, out: Path, *, half: bool = True) -> Path:
    """Write an HF Whisper folder as CTranslate2 writes one (binary version 6, WhisperSpec: fused
    q/k/v and k/v projections with zero k bias, gamma/beta norms, an alias for the output
    projection), with its config.json (suppress_ids) and tokenizer.json."""
    import struct

    import numpy as np
    from safetensors.numpy import load_file

    w = load_file(str(hf_folder / "model.safetensors"))
    cfg = json.loads((hf_folder / "config.json").read_text())
    gen = json.loads((hf_folder / "generation_config.json").read_text())
    dt = np.float16 if half else np.float32
    v: dict[str, np.ndarray] = {}

    def attn(src: str, dst: str, cross: bool) -> None:
        q, k, vv = (w[f"{src}.{p}_proj.weight"] for p in "qkv")
        zero = np.zeros_like(w[f"{src}.q_proj.bias"])
        if cross:
            v[f"{dst}/linear_0/weight"], v[f"{dst}/linear_0/bias"] = q, w[f"{src}.q_proj.bias"]
            v[f"{dst}/linear_1/weight"] = np.concatenate([k, vv])
            v[f"{dst}/linear_1/bias"] = np.concatenate([zero, w[f"{src}.v_proj.bias"]])
            o = "linear_2"
        else:
            v[f"{dst}/linear_0/weight"] = np.concatenate([q, k, vv])
            v[f"{dst}/linear_0/bias"] = np.concatenate([w[f"{src}.q_proj.bias"], zero, w[f"{src}.v_proj.bias"]])
            o = "linear_1"
        v[f"{dst}/{o}/weight"], v[f"{dst}/{o}/bias"] = w[f"{src}.out_proj.weight"], w[f"{src}.out_proj.bias"]
        v[f"{dst}/layer_norm/gamma"], v[f"{dst}/layer_norm/beta"] = w[f"{src}_layer_norm.weight"], \
            w[f"{src}_layer_norm.bias"]

    for conv in ("conv1", "conv2"):
        v[f"encoder/{conv}/weight"], v[f"encoder/{conv}/bias"] = w[f"model.encoder.{conv}.weight"], \
            w[f"model.encoder.{conv}.bias"]
    v["encoder/position_encodings/encodings"] = w["model.encoder.embed_positions.weight"]
    v["decoder/embeddings/weight"] = w["model.decoder.embed_tokens.weight"]
    v["decoder/position_encodings/encodings"] = w["model.decoder.embed_positions.weight"]
    for side in ("encoder", "decoder"):
        v[f"{side}/layer_norm/gamma"], v[f"{side}/layer_norm/beta"] = w[f"model.{side}.layer_norm.weight"], \
            w[f"model.{side}.layer_norm.bias"]
        v[f"{side}/num_heads"] = np.array(cfg[f"{side}_attention_heads"], np.int16)
        for i in range(cfg[f"{side}_layers"]):
            src, dst = f"model.{side}.layers.{i}", f"{side}/layer_{i}"
            attn(f"{src}.self_attn", f"{dst}/self_attention", False)
            if side == "decoder":
                attn(f"{src}.encoder_attn", f"{dst}/attention", True)
            for j, fc in ((0, "fc1"), (1, "fc2")):
                v[f"{dst}/ffn/linear_{j}/weight"], v[f"{dst}/ffn/linear_{j}/bias"] = w[f"{src}.{fc}.weight"], \
                    w[f"{src}.{fc}.bias"]
            v[f"{dst}/ffn/layer_norm/gamma"], v[f"{dst}/ffn/layer_norm/beta"] = w[f"{src}.final_layer_norm.weight"], \
                w[f"{src}.final_layer_norm.bias"]
    v["decoder/pre_norm"] = np.array(1, np.int8)
    codes = {np.dtype(np.float32): 0, np.dtype(np.int8): 1, np.dtype(np.int16): 2, np.dtype(np.float16): 4}

    def string(s: str) -> bytes:
        return struct.pack("<H", len(s) + 1) + s.encode() + b"\0"

    blob = [struct.pack("<I", 6), string("WhisperSpec"), struct.pack("<I", 3), struct.pack("<I", len(v))]
    for name, array in sorted(v.items()):
        a = np.ascontiguousarray(array.astype(dt) if array.dtype == np.float32 else array)
        blob += [string(name), struct.pack("<B", a.ndim), *(struct.pack("<I", d) for d in a.shape),
                 struct.pack("<B", codes[a.dtype]), struct.pack("<I", a.nbytes), a.tobytes()]
    blob += [struct.pack("<I", 1), string("decoder/projection/weight"), string("decoder/embeddings/weight")]
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.bin").write_bytes(b"".join(blob))
    (out / "config.json").write_text(json.dumps({"suppress_ids": gen.get("suppress_tokens") or [],
                                                 "suppress_ids_begin": gen.get("begin_suppress_tokens") or []}))
    (out / "tokenizer.json").write_text((hf_folder / "tokenizer.json").read_text())
    return out
