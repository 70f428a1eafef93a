"""Encoders' linear weights packed on CPU (_architectures/dense.py), for this package's kernel or
for oneDNN: the packed forward equals the plain ``F.linear`` one, and
``torch.backends.mkldnn.enabled = False`` (the configuration that stands for a torch without
oneDNN) builds the plain one."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from edgecompute_ml._architectures.dense import Dense
from edgecompute_ml._runtime.plan import ModelSource
from edgecompute_ml._runtime.store import inspect_model, load_model
from edgecompute_ml._tasks.embeddings import embed_texts

from .packing import PACKED, packed_as
from .packing import load as _load


def _dense_layers(model) -> list[Dense]:
    layers = model.layers if hasattr(model, "layers") else model.encoder.layers
    return [part for layer in layers for part in layer if isinstance(part, Dense)]


def _held_once(packed, plain, layers: list[Dense]) -> None:
    """No float copy is kept beside a packed weight: the packed model holds the plain one's bytes,
    plus the zero columns that pad the blocks to a multiple of 16 (none for oneDNN)."""
    padding = sum((d.weight.numel() - d.shape[0] * d.shape[1]) * 4 for d in layers if not d.weight.is_mkldnn)
    assert packed.weight_bytes() == plain.weight_bytes() + padding
    assert padding < plain.weight_bytes() / 4


def test_plain_when_onednn_is_switched_off(tiny_bert, tiny_vit):
    for folder in (tiny_bert, tiny_vit):
        layers = _dense_layers(_load(folder, packing="plain").model)
        assert layers and not any(d.packed for d in layers)
        assert all(d.weight.layout == torch.strided for d in layers)


@pytest.mark.parametrize("packing", PACKED)
def test_packed_bert_equals_plain(tiny_bert, packing):
    packed, plain = _load(tiny_bert, packing=packing), _load(tiny_bert, packing="plain")
    assert all(d.packing == packing for d in _dense_layers(packed.model))
    assert all(d.weight.is_mkldnn == (packing == "onednn") for d in _dense_layers(packed.model))
    assert sum(d.gelu for d in _dense_layers(packed.model)) == len(packed.model.layers)  # fused: the FFN's
    texts = ["a short one", "a somewhat longer sentence than the first", "x"]
    torch.testing.assert_close(embed_texts(packed, texts), embed_texts(plain, texts), atol=1e-5, rtol=1e-5)
    # a single text (no padding, no mask) and a padded batch agree row by row
    for i, text in enumerate(texts):
        torch.testing.assert_close(embed_texts(packed, [text])[0], embed_texts(packed, texts)[i], atol=1e-5, rtol=1e-5)
    _held_once(packed.model, plain.model, _dense_layers(packed.model))


@pytest.mark.parametrize("packing", PACKED)
def test_packed_vit_equals_plain(tiny_vit, packing):
    packed, plain = _load(tiny_vit, packing=packing), _load(tiny_vit, packing="plain")
    assert all(d.packing == packing for d in _dense_layers(packed.model))
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(packed.model.forward(pixels), plain.model.forward(pixels), atol=1e-5, rtol=1e-5)
    _held_once(packed.model, plain.model, _dense_layers(packed.model))


def test_dense_matches_linear_for_any_rows():
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(24, 16, generator=g), torch.randn(24, generator=g)
    for bias in (b, None):
        layer = Dense(w.clone(), bias, torch.device("cpu"), torch.float32)
        assert layer.shape == (24, 16)
        for shape in ((1, 16), (3, 5, 16), (0, 16)):
            x = torch.randn(*shape, generator=g)
            torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, w, bias), atol=1e-5, rtol=1e-5)
    fused = Dense(w.clone(), b, torch.device("cpu"), torch.float32, gelu=True)
    x = torch.randn(2, 16, generator=g)
    torch.testing.assert_close(fused(x), torch.nn.functional.gelu(torch.nn.functional.linear(x, w, b)),
                               atol=1e-5, rtol=1e-5)
    # a bfloat16 model is not packed (not every CPU has oneDNN's bfloat16 kernels)
    assert not Dense(w.bfloat16(), None, torch.device("cpu"), torch.bfloat16).packed


@pytest.mark.parametrize("packing", PACKED)
def test_packed_clip_equals_plain_and_holds_each_weight_once(tiny_clip, packing):
    packed, plain = _load(tiny_clip, packing=packing), _load(tiny_clip, packing="plain")
    towers = (packed.model.vision, packed.model.text)
    dense = [part for tower in towers for layer in tower.layers for part in layer if isinstance(part, Dense)]
    assert dense and all(part.packing == packing for part in dense)
    assert not any("encoder.layers." in name for name in packed.model.weights)  # moved into the towers, not copied
    pixels = torch.randn(2, 3, packed.model.config.image_size, packed.model.config.image_size,
                         generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[5, 6, 7, 2], [8, 9, 2, 0]])
    for a, b in ((packed.model.image_embeds(pixels), plain.model.image_embeds(pixels)),
                 (packed.model.text_embeds(ids), plain.model.text_embeds(ids))):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    _held_once(packed.model, plain.model, dense)


@pytest.mark.parametrize("packing", [*PACKED, "plain"])
def test_residual_added_in_the_kernel_gives_the_bits_of_a_separate_add(packing):
    g = torch.Generator().manual_seed(2)
    w, b = torch.randn(24, 16, generator=g), torch.randn(24, generator=g)
    with packed_as(packing):
        layer = Dense(w.clone(), b, torch.device("cpu"), torch.float32)
    assert layer.packing == packing
    for shape in ((1, 7), (3, 5)):
        x = torch.randn(*shape, 16, generator=g)
        residual = torch.randn(*shape, 24, generator=g)
        assert torch.equal(layer(x, residual), residual + layer(x))
    with pytest.raises(ValueError, match="without gelu"):
        Dense(w.clone(), b, torch.device("cpu"), torch.float32, gelu=True)(x, residual)


def test_texts_without_padding_embed_as_they_do_in_a_padded_batch(tiny_bert):
    # one text, or texts of one length, skip the mask (and the pooling's product with it): the
    # same vectors as when padding made a mask necessary, for every pooling
    lm = load_model(inspect_model(ModelSource("m", str(tiny_bert))), "float32", "cpu")
    same = ["a b c", "d e f"]
    lengths = [len(e.ids) for e in lm.tokenizer.encode_batch(same, add_special_tokens=True)]
    assert lengths[0] == lengths[1]
    for pooling in ("mean", "cls", "max"):
        padded = embed_texts(lm, [*same, "a much longer text than the two others"], pooling)
        alone = torch.cat([embed_texts(lm, [text], pooling) for text in same])
        torch.testing.assert_close(embed_texts(lm, same, pooling), padded[:2], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(alone, padded[:2], atol=1e-6, rtol=1e-6)


def test_the_layer_loop_is_scripted_with_the_kernel_off_and_names_the_kernels_attention():
    # a fresh process with the linear kernel turned off (oneDNN packing): TorchScript needs the
    # kernel ops' schemas all the same, or the loop silently ran eager (~0.5 ms a sentence slower)
    probe = ("from edgecompute_ml._architectures import bert\n"
             "f = bert._scripted(bert._packed_layers)\n"
             "print(type(f).__name__, 'edgecompute_ml::encoder_attention' in str(f.graph))\n")
    env = {**os.environ, "EDGECOMPUTE_ML_LINEAR_KERNEL": "0"}
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["ScriptFunction", "True"]


@pytest.mark.parametrize("packing", PACKED)
def test_the_scripted_layer_loop_gives_the_eager_loops_bits(tiny_bert, packing):
    from edgecompute_ml._architectures import bert

    scripted = bert._scripted(bert._packed_layers)
    assert isinstance(scripted, torch.jit.ScriptFunction)  # TorchScript is there in the torch we test with
    model = _load(tiny_bert, packing=packing).model
    # a packed model runs it, inside its scripted forward (tests/ml/test_bert_fast_path.py)
    assert model._packed is not None and model._forward_fn is bert._scripted(bert._packed_forward)
    c = model.config
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, c.hidden_size, generator=g)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])[:, None, None, :].to(torch.bool)
    for m in (None, mask):
        args = (x, model._packed, model._blocks, m, c.num_attention_heads, c.layer_norm_eps)
        assert torch.equal(scripted(*args), bert._packed_layers(*args))
    # a plain model (no oneDNN) runs the generic loop
    assert _load(tiny_bert, packing="plain").model._packed is None
