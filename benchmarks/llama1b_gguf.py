"""A random-weight GGUF with Llama-3.2-1B's shapes, quantized to Q4_0, for benchmarks/peers.py.

Hidden 2048, 16 layers, 32 heads, 8 KV heads, intermediate 8192, vocabulary 128256, tied
embeddings, rope theta 500000 with Llama 3's rope scaling (factor 32, as llama.cpp's converter
writes it: a ``rope_freqs`` tensor). Written with the ``gguf`` package (llama.cpp's gguf-py): its
``GGUFWriter`` and its ``quants.quantize`` (numpy Q4_0, llama.cpp's reference rounding). About 700
MB; built once into a cache folder (never committed), reused while the file is there.

    python benchmarks/llama1b_gguf.py [folder]
"""

from __future__ import annotations

import math
import sys
import tempfile
from pathlib import Path

import numpy as np

HIDDEN, LAYERS, HEADS, KV_HEADS, INTER, VOCAB = 2048, 16, 32, 8, 8192, 128256
HEAD_DIM = HIDDEN // HEADS
THETA, FACTOR, LOW, HIGH, ORIGINAL = 500000.0, 32.0, 1.0, 4.0, 8192
NAME = "llama-3.2-1b-shapes-random-q4_0.gguf"


def default_folder() -> Path:
    return Path(tempfile.gettempdir()) / "edgecompute-peers"


def _rope_divisors() -> np.ndarray:
    """llama.cpp's ``rope_freqs``: one divisor per rotary frequency (Llama 3 scaling)."""
    inv = THETA ** -(np.arange(0, HEAD_DIM, 2, dtype=np.float64) / HEAD_DIM)
    wavelen = 2 * math.pi / inv
    smooth = (ORIGINAL / wavelen - LOW) / (HIGH - LOW)
    return np.where(wavelen < ORIGINAL / HIGH, 1.0,
                    np.where(wavelen > ORIGINAL / LOW, FACTOR, 1 / ((1 - smooth) / FACTOR + smooth))).astype(np.float32)


def _q4_0(rng: np.random.Generator, rows: int, cols: int, std: float) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    parts = []
    for start in range(0, rows, 8192):  # a slice at a time: no 1 GB float32 embedding at once
        n = min(8192, rows - start)
        parts.append(quantize(rng.standard_normal((n, cols), dtype=np.float32) * std, GGMLQuantizationType.Q4_0))
    return np.concatenate(parts)


def build(folder: Path | None = None) -> Path:
    """The file's path, written first if it is not there yet."""
    import gguf

    folder = folder or default_folder()
    path = folder / NAME
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    tmp = path.with_suffix(".part")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name("Llama-3.2-1B shapes, random weights")
    w.add_context_length(131072)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(INTER)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_key_length(HEAD_DIM)
    w.add_value_length(HEAD_DIM)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(THETA)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(VOCAB)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    # a byte-level BPE vocabulary of the right size: the 256 byte symbols, a few merges, fillers
    byte_chars = _byte_chars()
    merges = [f"{a} {b}" for a in "etaoin" for b in "etaoin"]
    tokens = byte_chars + [a + b for a in "etaoin" for b in "etaoin"]
    specials = ["<|begin_of_text|>", "<|end_of_text|>"]
    tokens += [f"w{i}" for i in range(VOCAB - len(tokens) - len(specials))] + specials
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in specials else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(VOCAB - 2)
    w.add_eos_token_id(VOCAB - 1)
    q4 = gguf.GGMLQuantizationType.Q4_0
    std = 0.02
    w.add_tensor("token_embd.weight", _q4_0(rng, VOCAB, HIDDEN, std), raw_dtype=q4)
    w.add_tensor("output_norm.weight", np.ones(HIDDEN, dtype=np.float32))
    w.add_tensor("rope_freqs.weight", _rope_divisors())
    kv = KV_HEADS * HEAD_DIM
    for i in range(LAYERS):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(HIDDEN, dtype=np.float32))
        w.add_tensor(p + "ffn_norm.weight", np.ones(HIDDEN, dtype=np.float32))
        for name, rows, cols in (("attn_q", HIDDEN, HIDDEN), ("attn_k", kv, HIDDEN), ("attn_v", kv, HIDDEN),
                                 ("attn_output", HIDDEN, HIDDEN), ("ffn_gate", INTER, HIDDEN),
                                 ("ffn_up", INTER, HIDDEN), ("ffn_down", HIDDEN, INTER)):
            w.add_tensor(p + name + ".weight", _q4_0(rng, rows, cols, std), raw_dtype=q4)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.rename(path)
    return path


def _byte_chars() -> list[str]:
    """GPT-2's byte-to-unicode table (the byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs, strict=True))]


if __name__ == "__main__":
    print(build(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
