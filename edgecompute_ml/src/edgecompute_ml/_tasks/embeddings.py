"""Sentence embeddings with an encoder: tokenise, encode, pool, optionally normalise."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

__all__ = ["embed_lists", "embed_texts", "length_groups", "length_runs", "vector_lists"]

# up to this many rows, vector_lists normalises in Python (see there)
_FEW_ROWS = 8


def embed_texts(lm: Any, texts: Sequence[str], pooling: str | None = None, *, split: bool = False,
                runner: Any = None) -> Any:
    """Pooled (not normalised) embeddings of ``texts`` as a float32 tensor [N, H].

    With ``split`` (the batcher's batches), a batch on CPU runs as one forward per core over
    groups of texts of similar length, each padded only to its own longest text and run on one
    intra-op thread (see ``cpu_split``): less padding, and no barrier between the cores.
    ``runner`` is the ``SplitRunner`` to use (the executor's own; default: the process's).

    Texts longer than the model's ``max_length`` (a sentence-transformers folder's
    ``max_seq_length``, else the position limit) are truncated to it, special tokens included,
    as sentence-transformers truncates them.
    """
    import torch

    encodings = lm.tokenizer.encode_batch(list(texts), add_special_tokens=True)
    limit = lm.max_length
    lengths = [min(sum(e.attention_mask), limit) for e in encodings]
    device = lm.model.device
    method = pooling or lm.pooling
    if split and len(texts) > 1 and device.type == "cpu":
        if runner is None:
            from .._runtime.cpu_split import shared_runner

            runner = shared_runner()
        if runner.workers > 1:
            groups = length_groups(lengths, runner.workers)
            parts = runner.map(lambda rows: _embed(lm, [encodings[i] for i in rows], [lengths[i] for i in rows],
                                                   method), groups)
            out = torch.empty((len(texts), parts[0].shape[1]), dtype=parts[0].dtype)
            for rows, part in zip(groups, parts, strict=True):
                out[rows] = part
            return out
    return _embed(lm, encodings, lengths, method)


def embed_lists(lm: Any, texts: Sequence[str], normalized: Sequence[bool], pooling: str | None = None, *,
                split: bool = False, runner: Any = None) -> list[list[float]]:
    """``vector_lists(embed_texts(lm, texts, pooling, ...), normalized)``: the vectors as lists of
    floats, each L2-normalised where ``normalized`` says so.

    One text with mean pooling (a served sentence's usual case) takes a shorter way to the same
    vector (to float32 rounding): the model's ``sentence_vector`` runs the forward and the
    pooling (and the normalisation) in one call, and the vector becomes a list at once. Right
    after a forward has streamed the weights through every cache, each further torch op or
    Python step costs several times its warm time, and this way has the fewest (docs/ml.md).
    """
    if len(texts) == 1 and (pooling or lm.pooling) == "mean":
        # encode, not encode_batch: the same encoding, ~20 us sooner on cold caches
        encoding = lm.tokenizer.encode(texts[0], add_special_tokens=True)
        width = min(sum(encoding.attention_mask), lm.max_length)
        segments = encoding.type_ids[:width]
        # one segment (all type ids 0, a sentence's usual case): the model adds type 0's row itself
        vector = lm.model.sentence_vector(encoding.ids[:width], segments if any(segments) else None,
                                          normalize=normalized[0])
        row: list[float] = vector.tolist()
        return [row]
    return vector_lists(embed_texts(lm, texts, pooling, split=split, runner=runner), normalized)


def _forward_unpadded(lm: Any, encodings: Sequence[Any], width: int) -> Any:
    """The hidden states of texts that need no padding (one text, or texts of one length): no
    mask to build, pass or apply; the forward gives the same bits as with a mask of ones. To be
    called in ``torch.inference_mode()``."""
    import torch

    device = lm.model.device
    ids = torch.tensor([e.ids[:width] for e in encodings], dtype=torch.long)  # (no type to infer)
    segments = [e.type_ids[:width] for e in encodings]
    # one segment (all type ids 0, a sentence's usual case): the forward adds type 0's row itself
    types = torch.tensor(segments).to(device) if any(map(any, segments)) else None
    return lm.model.forward(ids.to(device), None, types)


def _embed(lm: Any, encodings: Sequence[Any], lengths: Sequence[int], pooling: str) -> Any:
    """Pooled embeddings of ``encodings``: one forward per run of similar length (see
    :func:`length_runs`), each padded only to its own longest text."""
    import torch

    runs = length_runs(lengths)
    if len(runs) == 1:
        return _embed_padded(lm, encodings, lengths, pooling)
    parts = [(rows, _embed_padded(lm, [encodings[i] for i in rows], [lengths[i] for i in rows], pooling))
             for rows in runs]
    out = torch.empty((len(encodings), parts[0][1].shape[1]), dtype=parts[0][1].dtype)
    for rows, part in parts:
        out[rows] = part
    return out


def _embed_padded(lm: Any, encodings: Sequence[Any], lengths: Sequence[int], pooling: str) -> Any:
    import torch

    device = lm.model.device
    width = max(lengths)
    if min(lengths) == width:
        with torch.inference_mode():
            hidden = _forward_unpadded(lm, encodings, width)
            if pooling == "mean":
                return (hidden.sum(1) / width).cpu()
            return pool(hidden, torch.ones(hidden.shape[:2], dtype=hidden.dtype, device=device), pooling).cpu()
    pad = lm.model.config.pad_token_id
    ids = torch.full((len(encodings), width), pad, dtype=torch.long)
    mask = torch.zeros((len(encodings), width), dtype=torch.long)
    types = torch.zeros((len(encodings), width), dtype=torch.long)
    for row, (e, n) in enumerate(zip(encodings, lengths, strict=True)):
        ids[row, :n] = torch.tensor(e.ids[:n])
        types[row, :n] = torch.tensor(e.type_ids[:n])
        mask[row, :n] = 1
    with torch.inference_mode():
        hidden = lm.model.forward(ids.to(device), mask.to(device), types.to(device))
        return pool(hidden, mask.to(device), pooling).cpu()


#: a run of texts of one length gets a forward of its own from this many texts on (fewer join the
#: next longer run, padded to it: a forward's fixed cost is ~0.3 ms, a padded token's ~0.5 us)
RUN_ROWS = 8


def length_runs(lengths: Sequence[int]) -> list[list[int]]:
    """Row indices in runs of rising length, each run one forward padded to its own longest
    text: texts of one length form a run once there are :data:`RUN_ROWS` of them, smaller sets
    join the next longer ones (the last run takes what is left). Padding is work for nothing:
    64 short sentences of 8-14 tokens padded to one width are ~12% padding, in runs ~2%."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    runs: list[list[int]] = [[]]
    for at, row in enumerate(order):
        runs[-1].append(row)
        following = order[at + 1] if at + 1 < len(order) else None
        if (following is not None and lengths[following] > lengths[row] and len(runs[-1]) >= RUN_ROWS):
            runs.append([])
    return runs


def length_groups(lengths: Sequence[int], workers: int) -> list[list[int]]:
    """Row indices in at most ``workers`` groups of similar length, whose tokens are as even as a
    cut of the rows sorted by length can make them (each group runs in length runs,
    :func:`length_runs`, so its work is about its tokens): the largest group bounds the batch's
    time. Two groups: the best cut; more: equal counts of sorted rows."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    k = min(workers, len(order))
    if k == 2:
        prefix = list(itertools.accumulate(lengths[i] for i in order))
        total = prefix[-1]
        cut = min(range(1, len(order)), key=lambda i: max(prefix[i - 1], total - prefix[i - 1]))
        return [order[:cut], order[cut:]]
    size, extra = divmod(len(order), k)
    groups, start = [], 0
    for g in range(k):
        end = start + size + (g < extra)
        groups.append(order[start:end])
        start = end
    return groups


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


def vector_lists(vectors: Any, normalized: Sequence[bool]) -> list[list[float]]:
    """``vectors`` [N, H] as N lists of floats, row ``i`` L2-normalised where ``normalized[i]``.

    A few rows are normalised in Python after ``tolist()`` (one torch op, where ``F.normalize``
    takes four, each slow right after a forward: see ``embed_lists``); many, in torch."""
    if len(normalized) <= _FEW_ROWS:
        out: list[list[float]] = vectors.tolist()
        for i, row in enumerate(out):
            if normalized[i]:
                scale = max(math.hypot(*row), 1e-12)
                out[i] = [x / scale for x in row]
        return out
    if all(normalized):
        vectors = normalize(vectors)
    elif any(normalized):
        import torch

        rows = torch.tensor([i for i, norm in enumerate(normalized) if norm])
        vectors = vectors.clone()
        vectors[rows] = normalize(vectors[rows])
    out = vectors.tolist()
    return out
