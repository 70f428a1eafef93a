"""One sentence's way through the ml executor (docs/ml.md, "One sentence"): where each step runs,
and that the short way for a lone request leaves batching under concurrent load as it was."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
import torch

from edgecompute import Config, Registry, Request, Resources, Runtime

from .conftest import scheduler_for

pytestmark = pytest.mark.anyio


def _runtime(executor: Any) -> Runtime:
    return Runtime(Registry([executor]), config=Config(), capacity=Resources(cpu=2, memory_mb=8192))


def test_a_lone_sentence_is_encoded_normalised_and_listed_on_the_models_thread(executor_for, monkeypatch):
    from edgecompute_ml._tasks import embeddings

    executor = executor_for()
    lm = executor.load("bert")
    ran: list[tuple[str, str, int]] = []
    sentence_vector = lm.model.sentence_vector

    def recording_sentence_vector(*args: Any, **kwargs: Any) -> Any:
        ran.append(("sentence_vector", threading.current_thread().name, torch.get_num_threads()))
        return sentence_vector(*args, **kwargs)

    embed_lists = embeddings.embed_lists

    def recording_embed_lists(*args: Any, **kwargs: Any) -> Any:
        ran.append(("embed_lists", threading.current_thread().name, torch.get_num_threads()))
        return embed_lists(*args, **kwargs)

    monkeypatch.setattr(lm.model, "sentence_vector", recording_sentence_vector)
    monkeypatch.setattr(embeddings, "embed_lists", recording_embed_lists)
    with _runtime(executor) as rt:
        outputs = [rt.run("ml/embeddings", text).outputs for text in ("hello world", "the lazy dog", "hi")]
        raw = rt.run("ml/embeddings", "hello world", params={"normalize": False}).outputs
    batcher = f"ml-batch-{lm.name}"
    # each request: encoded, pooled, normalised and made a list of floats in one call on the
    # model's own thread, whose torch runs the executor's intra-op thread count (the caller's
    # thread and the loop's only hand the texts over and the lists back); a lone text's forward
    # and pooling are the model's one sentence_vector call
    assert ran == [("embed_lists", batcher, 2), ("sentence_vector", batcher, 2)] * 4
    assert all(isinstance(v, list) and all(isinstance(x, float) for x in v) for v in outputs)
    assert abs(sum(x * x for x in outputs[0]) - 1) < 1e-5
    assert abs(sum(x * x for x in raw) - 1) > 1e-3
    torch.testing.assert_close(torch.nn.functional.normalize(torch.tensor(raw), dim=-1), torch.tensor(outputs[0]),
                               atol=1e-6, rtol=0)


async def test_one_batch_holds_normalised_and_raw_requests_each_as_asked(executor_for):
    from .tiny import CORPUS

    executor = executor_for(max_batch=8, max_delay_ms=50)
    texts = [f"{CORPUS[i % len(CORPUS)]} {i}" for i in range(16)]
    wants = [i % 3 != 0 for i in range(16)]  # normalise two in three
    async with scheduler_for(executor) as scheduler:
        alone = [(await scheduler.run("ml/embeddings", t, params={"batch": False, "normalize": n})).outputs
                 for t, n in zip(texts, wants, strict=True)]
        handles = [scheduler.submit(Request("ml/embeddings", t, params={"normalize": n}))
                   for t, n in zip(texts, wants, strict=True)]
        together = [(await h.result()).outputs for h in handles]
        batcher = executor.batcher(executor.load("bert"))
    assert max(batcher.batch_sizes) > 1  # they did share batches
    assert sum(size * count for size, count in batcher.batch_sizes.items()) == 16
    torch.testing.assert_close(torch.tensor(together), torch.tensor(alone), atol=1e-5, rtol=0)
    for vector, normalised in zip(together, wants, strict=True):
        assert (abs(sum(x * x for x in vector) - 1) < 1e-5) == normalised


def test_concurrent_callers_of_the_sync_face_still_share_batches(executor_for):
    # callers on threads of their own, each calling Runtime.run in turn: the batcher groups what
    # arrives while a batch runs (counts, not times: the sizes of the batches it ran)
    executor = executor_for(max_batch=8, max_delay_ms=20)
    with _runtime(executor) as rt:
        rt.run("ml/embeddings", "warm up")
        barrier = threading.Barrier(8)
        results: dict[int, list[Any]] = {}

        def caller(index: int) -> None:
            barrier.wait()
            results[index] = [rt.run("ml/embeddings", f"caller {index} sentence {k}").outputs for k in range(6)]

        threads = [threading.Thread(target=caller, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        batcher = executor.batcher(executor.load("bert"))
        alone = rt.run("ml/embeddings", "caller 3 sentence 2", params={"batch": False}).outputs
    assert sorted(results) == list(range(8))
    assert sum(size * count for size, count in batcher.batch_sizes.items()) == 1 + 8 * 6
    assert max(batcher.batch_sizes) > 1
    torch.testing.assert_close(torch.tensor(results[3][2]), torch.tensor(alone), atol=1e-5, rtol=0)


def test_vector_lists_normalises_the_rows_asked_for():
    from edgecompute_ml._tasks.embeddings import vector_lists

    vectors = torch.tensor([[3.0, 4.0], [6.0, 8.0], [0.5, 0.0]])
    close = torch.testing.assert_close
    close(torch.tensor(vector_lists(vectors, [True, True, True])), torch.tensor([[0.6, 0.8], [0.6, 0.8], [1.0, 0.0]]))
    close(torch.tensor(vector_lists(vectors, [False, True, False])), torch.tensor([[3.0, 4.0], [0.6, 0.8], [0.5, 0.0]]))
    assert vector_lists(vectors, [False] * 3) == vectors.tolist()
    assert vectors[1].tolist() == [6.0, 8.0]  # the caller's tensor is left as it was


async def test_a_cancelled_lone_request_ends_cancelled_and_the_next_one_runs(executor_for):
    # the batcher hands a cancelled request's result to nobody; the task's state is its cancel
    executor = executor_for()
    async with scheduler_for(executor) as scheduler:
        await scheduler.run("ml/embeddings", "warm up")
        handle = scheduler.submit(Request("ml/embeddings", "to be cancelled"))
        await asyncio.sleep(0)
        assert handle.cancel()
        assert handle.state.value == "cancelled"
        after = (await scheduler.run("ml/embeddings", "hello world")).outputs
        stats = scheduler.stats()
    assert len(after) == 48
    assert stats.finished["cancelled"] == 1 and stats.finished["succeeded"] == 2


@pytest.mark.parametrize("normalized", [True, False])
def test_one_text_short_way_gives_the_batch_paths_vector(executor_for, normalized):
    from edgecompute_ml._tasks.embeddings import embed_lists, embed_texts, normalize

    lm = executor_for().load("bert")
    for text in ("hello world", "the lazy dog jumps over the quick brown fox twice", "hi"):
        expected = embed_texts(lm, [text])
        if normalized:
            expected = normalize(expected)
        got = embed_lists(lm, [text], [normalized])
        torch.testing.assert_close(torch.tensor(got, dtype=torch.float32), expected, atol=1e-6, rtol=1e-6)
    # cls pooling and two texts take the tensor path: the same as the ops themselves
    two = embed_lists(lm, ["hello world", "hi"], [normalized, False], "cls")
    cls = embed_texts(lm, ["hello world", "hi"], "cls")
    torch.testing.assert_close(torch.tensor(two[1]), cls[1], atol=0, rtol=0)
