"""Sentence embeddings with an encoder: tokenise, encode, pool, optionally normalise."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["embed_texts"]


def embed_texts(lm: Any, texts: Sequence[str], pooling: str | None = None) -> Any:
    """Pooled (not normalised) embeddings of ``texts`` as a float32 tensor [N, H]."""
    import torch

    tokenizer = lm.tokenizer
    encodings = tokenizer.encode_batch(list(texts), add_special_tokens=True)
    limit = lm.max_length
    lengths = [min(sum(e.attention_mask), limit) for e in encodings]
    width = max(lengths)
    pad = lm.model.config.pad_token_id
    ids = torch.full((len(texts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(texts), width), dtype=torch.long)
    types = torch.zeros((len(texts), width), dtype=torch.long)
    for row, (e, n) in enumerate(zip(encodings, lengths, strict=True)):
        ids[row, :n] = torch.tensor(e.ids[:n])
        types[row, :n] = torch.tensor(e.type_ids[:n])
        mask[row, :n] = 1
    device = lm.model.device
    with torch.inference_mode():
        hidden = lm.model.forward(ids.to(device), mask.to(device), types.to(device))
        return pool(hidden, mask.to(device), pooling or lm.pooling).cpu()


def pool(hidden: Any, mask: Any, pooling: str) -> Any:

    if pooling == "cls":
        return hidden[:, 0]
    m = mask.unsqueeze(-1).to(hidden.dtype)
    if pooling == "max":
        return hidden.masked_fill(m == 0, float("-inf")).max(1).values
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def normalize(vectors: Any) -> Any:
    import torch.nn.functional as F

    return F.normalize(vectors, p=2, dim=-1)
