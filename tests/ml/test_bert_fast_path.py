"""The BERT encoder's compiled paths (_architectures/bert.py): the forward with its embeddings
inside one TorchScript call, and a lone sentence's ``sentence_vector`` (forward, mean pooling
and the optional L2 normalisation in that one call). Each against an independent reference
(transformers' own BertModel), against the plain eager loop (no oneDNN), and scripted against
the same functions run eagerly (a torch without TorchScript)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from edgecompute_ml._architectures import bert
from edgecompute_ml._tasks.embeddings import embed_lists, embed_texts, normalize
from edgecompute_ml.errors import ModelError

from .packing import PACKED
from .packing import load as _load

TEXTS = ("hello world", "the lazy dog jumps over the quick brown fox twice", "hi", "")


def _reference(folder, ids: list[int], types: list[int] | None) -> torch.Tensor:
    transformers = pytest.importorskip("transformers")
    model = transformers.BertModel.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor([ids]),
                       token_type_ids=None if types is None else torch.tensor([types])).last_hidden_state
    return hidden[0].mean(0)


@pytest.mark.parametrize("packing", [*PACKED, "plain"])
def test_sentence_vector_is_the_mean_of_transformers_hidden_states(tiny_bert, packing):
    lm = _load(tiny_bert, packing=packing)
    assert (lm.model._packed is not None) == (packing != "plain")
    ids = lm.tokenizer.encode("the quick brown fox", add_special_tokens=True).ids
    second = [0] * 3 + [1] * (len(ids) - 3)  # a second segment: the token-type table's row 1
    for types in (None, second):
        expected = _reference(tiny_bert, ids, types)
        got = lm.model.sentence_vector(ids, types)
        assert got.shape == expected.shape and got.dtype == torch.float32
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lm.model.sentence_vector(ids, types, normalize=True), F.normalize(expected, dim=0),
                                   atol=1e-5, rtol=1e-5)
    assert not torch.equal(lm.model.sentence_vector(ids, second), lm.model.sentence_vector(ids))


@pytest.mark.parametrize("packing", [*PACKED, "plain"])
def test_sentence_vector_is_the_forwards_pooling_to_float32_rounding(tiny_bert, packing):
    lm = _load(tiny_bert, packing=packing)
    for text in TEXTS:
        ids = lm.tokenizer.encode(text, add_special_tokens=True).ids
        hidden = lm.model.forward(torch.tensor([ids]), None, None)
        mean = hidden.sum(1)[0] / len(ids)
        torch.testing.assert_close(lm.model.sentence_vector(ids), mean, atol=1e-7, rtol=0)
        torch.testing.assert_close(lm.model.sentence_vector(ids, normalize=True), F.normalize(mean, dim=0),
                                   atol=1e-7, rtol=0)
        # a tuple of ids is as good as a list
        assert torch.equal(lm.model.sentence_vector(tuple(ids)), lm.model.sentence_vector(ids))


def test_sentence_vector_refuses_more_tokens_than_positions(tiny_bert):
    lm = _load(tiny_bert, packing="blocks")
    limit = lm.model.config.max_position_embeddings
    with pytest.raises(ModelError, match=f"{limit + 1} tokens exceeds the model's {limit} positions"):
        lm.model.sentence_vector([5] * (limit + 1))
    assert lm.model.sentence_vector([5] * limit).shape == (lm.model.config.hidden_size,)


@pytest.mark.parametrize("packing", PACKED)
def test_scripted_forward_and_sentence_give_the_eager_functions_bits(tiny_bert, packing):
    model = _load(tiny_bert, packing=packing).model
    assert model._blocks == (packing == "blocks")
    assert isinstance(model._forward_fn, torch.jit.ScriptFunction)  # TorchScript is there in the torch we test
    assert isinstance(model._sentence_fn, torch.jit.ScriptFunction)
    c, weights = model.config, model._embedding_weights
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(5, c.vocab_size, (2, 7), generator=g)
    types = torch.tensor([[0] * 7, [0] * 3 + [1] * 4])
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])[:, None, None, :].to(torch.bool)
    for t, m in ((None, None), (types, None), (types, mask)):
        args = (ids, t, m, weights, model._packed, model._blocks, c.num_attention_heads, c.layer_norm_eps)
        assert torch.equal(model._forward_fn(*args), bert._packed_forward(*args))
    row = ids[1].tolist()
    for t in (None, types[1].tolist()):
        for norm in (False, True):
            args = (row, t, weights, model._packed, model._blocks, c.num_attention_heads, c.layer_norm_eps, norm)
            assert torch.equal(model._sentence_fn(*args), bert._packed_sentence(*args))


@pytest.mark.parametrize("packing", PACKED)
def test_without_torchscript_the_same_functions_run_eagerly(tiny_bert, packing, monkeypatch):
    scripted = _load(tiny_bert, packing=packing)

    def no_script(fn):
        raise RuntimeError("no TorchScript in this torch")

    monkeypatch.setattr(bert, "_SCRIPTED", {})  # as in a fresh process
    monkeypatch.setattr(torch.jit, "script", no_script)
    eager = _load(tiny_bert, packing=packing)
    assert eager.model._packed is not None  # still packed: only the dispatching is Python's
    assert eager.model._forward_fn is bert._packed_forward and eager.model._sentence_fn is bert._packed_sentence
    for text in TEXTS:
        for norm in (False, True):
            assert embed_lists(eager, [text], [norm]) == embed_lists(scripted, [text], [norm])
    assert torch.equal(embed_texts(eager, list(TEXTS)), embed_texts(scripted, list(TEXTS)))


@pytest.mark.parametrize("packing", [*PACKED, "plain"])
def test_a_lone_text_takes_the_sentence_path_and_gives_the_batch_paths_vector(tiny_bert, packing, monkeypatch):
    lm = _load(tiny_bert, packing=packing)
    calls: list[tuple[list[int], bool]] = []
    sentence_vector = lm.model.sentence_vector

    def recording(ids, type_ids=None, *, normalize=False):
        calls.append((list(ids), normalize))
        return sentence_vector(ids, type_ids, normalize=normalize)

    monkeypatch.setattr(lm.model, "sentence_vector", recording)
    for text in TEXTS:
        for norm in (False, True):
            got = embed_lists(lm, [text], [norm])
            assert len(got) == 1 and all(type(x) is float for x in got[0])
            expected = embed_texts(lm, [text])
            torch.testing.assert_close(torch.tensor(got), normalize(expected) if norm else expected, atol=1e-7, rtol=0)
    assert [norm for _, norm in calls] == [False, True] * len(TEXTS)
    assert calls[0][0] == lm.tokenizer.encode(TEXTS[0], add_special_tokens=True).ids
    # cls and max pooling, and several texts, take the batch path (no sentence_vector call)
    calls.clear()
    embed_lists(lm, ["hello world"], [True], "cls")
    embed_lists(lm, ["hello world"], [False], "max")
    embed_lists(lm, ["hello world", "hi"], [True, False])
    assert calls == []


def test_a_lone_text_is_truncated_to_the_models_max_length(tiny_bert):
    lm = _load(tiny_bert, packing="blocks")
    long = " ".join(["fox"] * 200)
    assert len(lm.tokenizer.encode(long, add_special_tokens=True).ids) == lm.max_length
    torch.testing.assert_close(torch.tensor(embed_lists(lm, [long], [False])), embed_texts(lm, [long]),
                               atol=1e-7, rtol=0)


@pytest.mark.parametrize("packing", PACKED)
def test_the_eager_layer_loop_calls_only_its_own_ops(tiny_bert, packing):
    # run eagerly, an unqualified call of the residual-add overload made torch's overload
    # resolution iterate the residual as a list of scalars (a select and an item per element):
    # ~35 ms a MiniLM forward instead of ~3; counted here, not timed
    model = _load(tiny_bert, packing=packing).model
    c = model.config
    x = torch.randn(2, 6, c.hidden_size)
    with torch.inference_mode(), torch.profiler.profile() as prof:
        bert._packed_layers(x, model._packed, model._blocks, None, c.num_attention_heads, c.layer_norm_eps)
    counts = {e.key: e.count for e in prof.key_averages()}
    op = "edgecompute_ml::f32_linear" if packing == "blocks" else "mkldnn::_linear_pointwise"
    assert counts[op] == 4 * c.num_hidden_layers
    assert "aten::item" not in counts and "aten::is_nonzero" not in counts
    assert counts["aten::select"] == 3 * c.num_hidden_layers  # q, k and v out of each layer's unbind
