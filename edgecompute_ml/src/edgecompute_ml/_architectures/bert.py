"""A compact BERT-family encoder (BERT, MiniLM, sentence-transformers checkpoints)."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
import torch
import torch.nn.functional as F

from .._kernels.build import declare_linear
from .._runtime.hugepages import region_for
from ..errors import ModelError
from .dense import Dense, linear

__all__ = ["BertConfig", "BertModel"]

MODEL_TYPES = ("bert",)
ARCHITECTURES = ("BertModel", "BertForMaskedLM", "BertForPreTraining", "BertForSequenceClassification")

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": lambda x: F.gelu(x),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


@attrs.frozen
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pad_token_id: int = 0
    prefix: str = ""

    @classmethod
    def from_hf(cls, config: Mapping[str, Any], source: str = "config.json") -> BertConfig:
        try:
            act = config.get("hidden_act", "gelu")
            if act not in _ACTIVATIONS:
                raise ModelError(f"{source}: hidden_act {act!r} not supported ({', '.join(_ACTIVATIONS)})")
            pet = config.get("position_embedding_type", "absolute")
            if pet != "absolute":
                raise ModelError(f"{source}: position_embedding_type {pet!r} not supported (only 'absolute')")
            return cls(
                vocab_size=int(config["vocab_size"]),
                hidden_size=int(config["hidden_size"]),
                num_hidden_layers=int(config["num_hidden_layers"]),
                num_attention_heads=int(config["num_attention_heads"]),
                intermediate_size=int(config["intermediate_size"]),
                max_position_embeddings=int(config.get("max_position_embeddings", 512)),
                type_vocab_size=int(config.get("type_vocab_size", 2)),
                layer_norm_eps=float(config.get("layer_norm_eps", 1e-12)),
                hidden_act=act,
                pad_token_id=int(config.get("pad_token_id") or 0),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{source}: invalid BERT config: {type(exc).__name__}: {exc}") from exc

    def with_prefix(self, tensor_names: Any) -> BertConfig:
        """Checkpoints saved from BertFor* carry a ``bert.`` prefix; candle accepts both."""
        names = set(tensor_names)
        if "embeddings.word_embeddings.weight" not in names and "bert.embeddings.word_embeddings.weight" in names:
            return attrs.evolve(self, prefix="bert.")
        return self

    def expected_tensors(self) -> dict[str, tuple[int, ...]]:
        h, i, p = self.hidden_size, self.intermediate_size, self.prefix
        out: dict[str, tuple[int, ...]] = {
            p + "embeddings.word_embeddings.weight": (self.vocab_size, h),
            p + "embeddings.position_embeddings.weight": (self.max_position_embeddings, h),
            p + "embeddings.token_type_embeddings.weight": (self.type_vocab_size, h),
            p + "embeddings.LayerNorm.weight": (h,),
            p + "embeddings.LayerNorm.bias": (h,),
        }
        for n in range(self.num_hidden_layers):
            q = f"{p}encoder.layer.{n}."
            for part in ("attention.self.query", "attention.self.key", "attention.self.value",
                         "attention.output.dense"):
                out[q + part + ".weight"] = (h, h)
                out[q + part + ".bias"] = (h,)
            out |= {
                q + "attention.output.LayerNorm.weight": (h,), q + "attention.output.LayerNorm.bias": (h,),
                q + "intermediate.dense.weight": (i, h), q + "intermediate.dense.bias": (i,),
                q + "output.dense.weight": (h, i), q + "output.dense.bias": (h,),
                q + "output.LayerNorm.weight": (h,), q + "output.LayerNorm.bias": (h,),
            }
        return out


class BertModel:
    """Encoder forward: token ids and attention mask -> last hidden states (float32)."""

    family = "bert"

    def __init__(self, config: BertConfig, weights: Mapping[str, torch.Tensor], dtype: torch.dtype,
                 device: torch.device) -> None:
        self.config = config
        self.dtype = dtype
        self.device = device
        p, w = config.prefix, weights
        self.word = w[p + "embeddings.word_embeddings.weight"]
        self.position = w[p + "embeddings.position_embeddings.weight"]
        self.token_type = w[p + "embeddings.token_type_embeddings.weight"]
        self.ln = (w[p + "embeddings.LayerNorm.weight"], w[p + "embeddings.LayerNorm.bias"])
        self.layers: list[tuple[Dense, Dense, tuple[torch.Tensor, torch.Tensor], Dense, Dense,
                                tuple[torch.Tensor, torch.Tensor]]] = []
        for n in range(config.num_hidden_layers):
            q = f"{p}encoder.layer.{n}."
            s = q + "attention.self."
            self.layers.append((
                Dense(torch.cat([w[s + "query.weight"], w[s + "key.weight"], w[s + "value.weight"]]),
                      torch.cat([w[s + "query.bias"], w[s + "key.bias"], w[s + "value.bias"]]), device, dtype),
                Dense(w[q + "attention.output.dense.weight"], w[q + "attention.output.dense.bias"], device, dtype),
                (w[q + "attention.output.LayerNorm.weight"], w[q + "attention.output.LayerNorm.bias"]),
                Dense(w[q + "intermediate.dense.weight"], w[q + "intermediate.dense.bias"], device, dtype,
                      gelu=config.hidden_act == "gelu"),
                Dense(w[q + "output.dense.weight"], w[q + "output.dense.bias"], device, dtype),
                (w[q + "output.LayerNorm.weight"], w[q + "output.LayerNorm.bias"]),
            ))
        # every sentence reads every layer's weights: they go into huge pages together (one copy)
        dense = [lin for layer in self.layers for lin in layer if isinstance(lin, Dense)]
        region = region_for(lin.weight for lin in dense)
        if region is not None:
            for lin in dense:
                lin.weight = region.copy(lin.weight)  # the original dropped as its copy replaces it
        self._act = _ACTIVATIONS[config.hidden_act]
        # every layer packed alike, its GELU exact: the embeddings, the layer loop and a lone
        # sentence's pooling run as TorchScript (below)
        self._packed: list[torch.Tensor] | None = None
        self._blocks = False  # packed for this package's kernel, else for oneDNN
        self._embedding_weights = [self.word, self.position, self.token_type, *self.ln]
        self._forward_fn: Callable[..., torch.Tensor] = _packed_forward
        self._sentence_fn: Callable[..., torch.Tensor] = _packed_sentence
        packings = {lin.packing for qkv, o, ln1, i, d, ln2 in self.layers for lin in (qkv, o, i, d)}
        if len(packings) == 1 and "plain" not in packings and all(i.gelu for qkv, o, ln1, i, d, ln2 in self.layers):
            self._packed = [t for qkv, o, ln1, i, d, ln2 in self.layers
                            for t in (qkv.weight, qkv.bias, o.weight, o.bias, *ln1, i.weight, i.bias, d.weight,
                                      d.bias, *ln2) if t is not None]
            self._blocks = packings == {"blocks"}
            if len(self._packed) == 12 * len(self.layers):  # every layer has its biases (BERT's do)
                self._forward_fn = _scripted(_packed_forward)
                self._sentence_fn = _scripted(_packed_sentence)
            else:
                self._packed = None

    def weight_bytes(self) -> int:
        tensors = [self.word, self.position, self.token_type, *self.ln]
        tensors += [t for qkv, o, ln1, i, d, ln2 in self.layers for t in (*ln1, *ln2)]
        dense = sum(lin.nbytes for qkv, o, ln1, i, d, ln2 in self.layers for lin in (qkv, o, i, d))
        return dense + sum(t.numel() * t.element_size() for t in tensors)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        c = self.config
        b, t = input_ids.shape
        if t > c.max_position_embeddings:
            raise ModelError(f"input of {t} tokens exceeds the model's {c.max_position_embeddings} positions")
        h, nh = c.hidden_size, c.num_attention_heads
        hd = h // nh
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = attention_mask[:, None, None, :].to(torch.bool)
        if self._packed is not None:
            return self._forward_fn(input_ids, token_type_ids, mask, self._embedding_weights, self._packed,
                                    self._blocks, nh, c.layer_norm_eps)
        x = _embeddings(input_ids, token_type_ids, self._embedding_weights, c.layer_norm_eps)
        for qkv_lin, o_lin, ln1, i_lin, d_lin, ln2 in self.layers:
            q, k, v = qkv_lin(x).view(b, t, 3, nh, hd).permute(2, 0, 3, 1, 4).unbind(0)
            # CPU attention writes its output [b, t, heads, hd] and returns it transposed: the
            # transpose back is contiguous again, so the reshape is a view
            attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, t, h)
            # the residual adds are fused into the output projections (one op less each, same bits)
            x = F.layer_norm(o_lin(attn, x), (h,), *ln1, eps=c.layer_norm_eps)
            inter = i_lin(x) if i_lin.gelu else self._act(i_lin(x))
            x = F.layer_norm(d_lin(inter, x), (h,), *ln2, eps=c.layer_norm_eps)
        return x.float()

    def sentence_vector(self, ids: Sequence[int], type_ids: Sequence[int] | None = None, *,
                        normalize: bool = False) -> torch.Tensor:
        """One text's token ids (no padding) -> the mean of its last hidden states [H] (float32),
        L2-normalised (to at least 1e-12, as ``F.normalize``) with ``normalize``; ``type_ids``
        None: every token of segment 0.

        The same vector as :meth:`forward` then a mean (to float32 rounding: the division is
        float32 here), in fewer steps: with packed weights one TorchScript call takes the ids as
        a list and runs the embeddings, the layers and the pooling. Right after a forward has
        streamed the weights through every cache, each eager op, and each tensor built in Python,
        costs several times its warm time (``torch.tensor`` of 12 ids ~55 us; docs/ml.md, "One
        sentence").
        """
        c = self.config
        if len(ids) > c.max_position_embeddings:
            raise ModelError(f"input of {len(ids)} tokens exceeds the model's {c.max_position_embeddings} positions")
        tokens, types = list(ids), None if type_ids is None else list(type_ids)
        with torch.inference_mode():
            if self._packed is not None:
                return self._sentence_fn(tokens, types, self._embedding_weights, self._packed, self._blocks,
                                         c.num_attention_heads, c.layer_norm_eps, normalize)
            hidden = self.forward(torch.tensor([tokens], dtype=torch.long, device=self.device), None,
                                  None if types is None else torch.tensor([types], dtype=torch.long,
                                                                          device=self.device))[0]
            return _pooled(hidden, normalize)


def _embeddings(ids: torch.Tensor, types: torch.Tensor | None, weights: list[torch.Tensor],
                eps: float) -> torch.Tensor:
    """Word + position + token-type embeddings, normalised; ``weights``: the word, position and
    token-type tables, the norm's weight and bias. ``types`` None: segment 0 everywhere."""
    word, position, token_type = weights[0], weights[1], weights[2]
    x = F.embedding(ids, word) + position[:ids.shape[-1]]
    x = x + (token_type[0] if types is None else F.embedding(types, token_type))
    return F.layer_norm(x, [word.shape[1]], weights[3], weights[4], eps)


def _packed_layers(x: torch.Tensor, weights: list[torch.Tensor], blocks: bool, mask: torch.Tensor | None,
                   heads: int, eps: float) -> torch.Tensor:
    """The encoder layers over packed weights (12 a layer: q/k/v, output, first norm, FFN in and
    out, second norm; weights then biases; ``blocks``: packed for this package's kernels, else for
    oneDNN), the residual adds in the kernels: the same ops as :meth:`BertModel.forward`'s loop,
    in a form TorchScript compiles. With ``blocks``, self-attention is the kernels' too
    (``encoder_attention``, linear.cpp: a batch of short sentences spent ~15% of its forward in
    torch's CPU attention)."""
    b, t, h = x.shape[0], x.shape[1], x.shape[2]
    hd = h // heads
    for n in range(len(weights) // 12):
        w = n * 12
        qkv = linear(x, weights[w], weights[w + 1], None, False, blocks)
        if blocks and hd % 8 == 0:  # this package's kernels: its attention reads the fused q/k/v in place
            attn = torch.ops.edgecompute_ml.encoder_attention(qkv, mask, heads)
        else:
            q, k, v = qkv.view(b, t, 3, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
            attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, t, h)
        x = F.layer_norm(linear(attn, weights[w + 2], weights[w + 3], x, False, blocks), [h], weights[w + 4],
                         weights[w + 5], eps)
        inter = linear(x, weights[w + 6], weights[w + 7], None, True, blocks)
        x = F.layer_norm(linear(inter, weights[w + 8], weights[w + 9], x, False, blocks), [h], weights[w + 10],
                         weights[w + 11], eps)
    return x


def _packed_forward(ids: torch.Tensor, types: torch.Tensor | None, mask: torch.Tensor | None,
                    embedding_weights: list[torch.Tensor], weights: list[torch.Tensor], blocks: bool, heads: int,
                    eps: float) -> torch.Tensor:
    """:meth:`BertModel.forward` over packed weights: ids [B, T] -> last hidden states."""
    return _packed_layers(_embeddings(ids, types, embedding_weights, eps), weights, blocks, mask, heads, eps)


def _pooled(hidden: torch.Tensor, normalize: bool) -> torch.Tensor:
    """One text's hidden states [T, H] -> their mean, or its unit vector (the mean's length
    cancels: the sum's is taken)."""
    total = hidden.sum(0)
    if normalize:
        length: torch.Tensor = torch.linalg.vector_norm(total)
        return total / length.clamp_min(1e-12)
    return total / hidden.shape[0]


def _packed_sentence(ids: list[int], types: list[int] | None, embedding_weights: list[torch.Tensor],
                     weights: list[torch.Tensor], blocks: bool, heads: int, eps: float,
                     normalize: bool) -> torch.Tensor:
    """:meth:`BertModel.sentence_vector` over prepacked weights: one text's ids -> its pooled
    vector [H]. The ids become a tensor here, inside the compiled function (cheaper than a
    ``torch.tensor`` call from Python on cold caches)."""
    x = _embeddings(torch.tensor([ids], dtype=torch.long),
                    None if types is None else torch.tensor([types], dtype=torch.long), embedding_weights, eps)
    return _pooled(_packed_layers(x, weights, blocks, None, heads, eps)[0], normalize)


_SCRIPT_LOCK = threading.Lock()
_SCRIPTED: dict[Callable[..., torch.Tensor], Callable[..., torch.Tensor]] = {}


def _scripted(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``fn`` compiled by TorchScript once per process, else ``fn`` itself (eager).

    Run by TorchScript's interpreter, the ~60 ops of a MiniLM forward skip Python's per-op cost:
    one sentence's forward 2.92 -> 2.64 ms here (p10 of interleaved runs), the same bits. The
    kernels are the same; only the dispatching moves out of Python. ``torch.jit.script`` is
    deprecated in torch 2.13 (its warning is silenced here): where it is gone or fails, the same
    function runs eagerly, ~0.5 ms a forward slower (3.56 vs 2.98 ms, median, interleaved).
    """
    declare_linear()  # the functions name f32_linear: TorchScript needs its schema, loaded or not
    with _SCRIPT_LOCK:
        if fn not in _SCRIPTED:
            compiled: Callable[..., torch.Tensor] = fn
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    compiled = torch.jit.script(fn)
            except Exception:  # noqa: BLE001 - no TorchScript here: the eager function is the same ops
                compiled = fn
            _SCRIPTED[fn] = compiled
        return _SCRIPTED[fn]


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
