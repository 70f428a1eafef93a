"""edgecompute_ml's one-query attention (``_kernels/attention.cpp``,
``torch.ops.edgecompute_ml.one_query_attention``): against torch's attention over exactly the keys a
decode step may see, for grouped heads, odd head sizes, sliding windows and cache slices; clear
errors for misuse; and the decoder taking it, or torch's attention when it is off."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from edgecompute_ml._kernels import build

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def attend():
    if not build.load_attention():
        pytest.fail(f"the attention kernel did not load here: {build.attention_status()}")
    return torch.ops.edgecompute_ml.one_query_attention


def _reference(q, k, v, start, end, scale):
    rep = q.shape[1] // k.shape[1]
    keys = k[:, :, start:end].repeat_interleave(rep, dim=1)
    values = v[:, :, start:end].repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q.double(), keys.double(), values.double(), scale=scale).float()


@pytest.mark.parametrize(("batch", "heads", "kv", "d"), [(1, 9, 3, 64), (2, 4, 4, 32), (1, 8, 1, 80), (3, 2, 1, 5)])
@pytest.mark.parametrize("window", [0, 1, 7])
def test_equals_attention_over_the_keys_up_to_the_position(attend, batch, heads, kv, d, window):
    g = torch.Generator().manual_seed(batch * 100 + heads * 10 + d + window)
    capacity = 40
    q = torch.randn(batch, heads, 1, d, generator=g)
    # the cache holds garbage past the position: it must never be read into the result
    k, v = torch.randn(batch, kv, capacity, d, generator=g), torch.randn(batch, kv, capacity, d, generator=g)
    for position in (0, 1, 17, capacity - 1):
        got = attend(q, k, v, torch.tensor([position]), window, 0.3)
        start = max(0, position + 1 - window) if window else 0
        torch.testing.assert_close(got, _reference(q, k, v, start, position + 1, 0.3), rtol=1e-5, atol=2e-6)
        k2, v2 = k.clone(), v.clone()
        k2[:, :, position + 1:] = float("nan")
        v2[:, :, position + 1:] = 1e30
        assert torch.equal(attend(q, k2, v2, torch.tensor([position]), window, 0.3), got)


def test_without_a_position_the_query_follows_every_key_and_slices_are_read_in_place(attend):
    g = torch.Generator().manual_seed(7)
    cache_k, cache_v = torch.randn(2, 3, 50, 16, generator=g), torch.randn(2, 3, 50, 16, generator=g)
    q = torch.randn(2, 6, 16, 1, generator=g).transpose(2, 3)  # a strided query, as the decoder's view
    k, v = cache_k[:, :, 10:30], cache_v[:, :, 10:30]  # a slice: not contiguous over B and heads
    assert not k.is_contiguous()
    expected = _reference(q.contiguous(), k, v, 0, 20, 0.25)
    torch.testing.assert_close(attend(q, k, v, None, 0, 0.25), expected, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(attend(q, k, v, None, 5, 0.25), _reference(q.contiguous(), k, v, 15, 20, 0.25),
                               rtol=1e-5, atol=2e-6)


def test_a_long_context_splits_heads_across_threads_with_the_same_result(attend):
    g = torch.Generator().manual_seed(8)
    q, k, v = torch.randn(1, 8, 1, 64, generator=g), torch.randn(1, 2, 4096, 64, generator=g), \
        torch.randn(1, 2, 4096, 64, generator=g)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = attend(q, k, v, torch.tensor([4000]), 0, 0.125)
        torch.set_num_threads(2)
        split = attend(q, k, v, torch.tensor([4000]), 0, 0.125)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(alone, split)  # each head is computed whole by one thread
    torch.testing.assert_close(split, _reference(q, k, v, 0, 4001, 0.125), rtol=1e-5, atol=2e-6)


def test_misuse_is_a_clear_error(attend):
    q, k = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 10, 8)
    cases = [
        ((q, k, k, torch.tensor([10]), 0, 1.0), "position 10 outside the 10 keys"),
        ((q, k, k, torch.tensor([-1]), 0, 1.0), "position -1 outside"),
        ((q, k, k, torch.tensor([1, 2]), 0, 1.0), "position must be one int64"),
        ((q, k, k, torch.tensor([1.0]), 0, 1.0), "position must be one int64"),
        ((torch.randn(1, 4, 2, 8), k, k, None, 0, 1.0), "one query a sequence, not 2"),
        ((torch.randn(1, 3, 1, 8), k, k, None, 0, 1.0), "3 query heads over 2 key heads"),
        ((q, k, torch.randn(1, 2, 9, 8), None, 0, 1.0), "k and v must be"),
        ((q.double(), k, k, None, 0, 1.0), "float32 CPU tensors"),
        ((q, k.transpose(2, 3).contiguous().transpose(2, 3), k, None, 0, 1.0), "contiguous rows"),
        ((q, torch.randn(1, 2, 0, 8), torch.randn(1, 2, 0, 8), None, 0, 1.0), "no keys"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            attend(*args)


def _tiny_llama(sliding_window=None):
    from edgecompute_ml._architectures.llama import LlamaConfig, LlamaModel

    config = LlamaConfig.from_hf({"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
                                  "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                  "max_position_embeddings": 64, "sliding_window": sliding_window,
                                  "model_type": "mistral" if sliding_window else "llama"})
    g = torch.Generator().manual_seed(11)
    weights = {name: torch.randn(shape, generator=g) * 0.2 for name, shape in config.expected_tensors().items()}
    return LlamaModel(config, weights, torch.float32, torch.device("cpu"))


@pytest.mark.parametrize("sliding_window", [None, 3])
def test_the_decoder_takes_it_for_one_query_and_gives_torchs_logits(attend, monkeypatch, sliding_window):
    ids = torch.tensor([[5, 9, 2, 31, 7, 40, 12, 3]])
    runs = {}
    for switch in ("1", "0"):
        monkeypatch.setenv(build.ATTENTION_DISABLE_ENV, switch)
        model = _tiny_llama(sliding_window)
        assert model._one_query is (switch == "1")
        cache = model.new_cache(16)
        model.forward(ids[:, :5], cache)
        eager = [model.forward(ids[:, i:i + 1], cache) for i in range(5, 8)]  # forward, one query a step
        k = [torch.zeros_like(t) for t in cache.k]
        v = [torch.zeros_like(t) for t in cache.v]
        for i in range(len(k)):  # the step function over a cache of fixed capacity, as captured
            k[i][:, :, :5], v[i][:, :, :5] = cache.k[i][:, :, :5], cache.v[i][:, :, :5]
        steps = [model.decode_step(ids[:, i:i + 1], torch.tensor([i]), k, v, cache.rope) for i in range(5, 8)]
        runs[switch] = (eager, steps)
    assert build.attention_status() is not None and "turned off" in build.attention_status()
    for ours, torchs in zip(runs["1"][0] + runs["1"][1], runs["0"][0] + runs["0"][1], strict=True):
        torch.testing.assert_close(ours, torchs, rtol=1e-5, atol=1e-5)
