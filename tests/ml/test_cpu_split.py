"""The CPU batch splitter: same results as one forward, one intra-op thread per worker, errors
surface on the caller, and the process's thread setting is left as it was."""

from __future__ import annotations

import itertools
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edgecompute_ml._runtime.cpu_split import SplitRunner


@pytest.fixture(scope="module")
def runners():
    made = {n: SplitRunner(n) for n in (1, 2, 3)}
    yield made
    for runner in made.values():
        runner.close()


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 9), workers=st.sampled_from([1, 2, 3]), seed=st.integers(0, 2**16))
def test_split_equals_one_call_row_for_row(runners, rows, workers, seed):
    generator = torch.Generator().manual_seed(seed)
    batch = torch.randn(rows, 3, 5, 5, generator=generator)
    weight = torch.randn(4, 3, 3, 3, generator=generator)

    def fn(x):  # rows are independent, as in a classifier's forward pass
        return torch.nn.functional.conv2d(x, weight).relu().mean(dim=(2, 3))

    out = runners[workers](fn, batch)
    assert out.shape == (rows, 4)
    torch.testing.assert_close(out, fn(batch), rtol=1e-5, atol=1e-6)


def test_workers_run_one_intra_op_thread_and_the_default_is_kept(runners):
    before = torch.get_num_threads()
    seen: list[tuple[str, int]] = []

    def fn(x):
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return x

    out = runners[2](fn, torch.arange(6.0))
    assert out.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert sorted(name for name, _ in seen) == ["ml-split-0", "ml-split-1"]
    assert all(count == 1 for _, count in seen)
    assert torch.get_num_threads() == before
    fresh: list[int] = []
    thread = threading.Thread(target=lambda: fresh.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert fresh == [before]  # threads that start later still get the process's setting


def test_a_single_row_runs_on_the_callers_thread(runners):
    names: list[str] = []
    runners[2](lambda x: names.append(threading.current_thread().name) or x, torch.zeros(1, 2))
    assert names == [threading.current_thread().name]


def test_an_error_in_a_worker_is_raised_to_the_caller_and_the_runner_still_works(runners):
    def fn(x):
        if float(x[0]) >= 3:
            raise ValueError(f"bad row {float(x[0])}")
        return x * 2

    with pytest.raises(ValueError, match="bad row 3"):
        runners[2](fn, torch.arange(6.0))
    assert runners[2](fn, torch.arange(2.0)).tolist() == [0.0, 2.0]


def test_workers_must_be_positive():
    with pytest.raises(ValueError, match="workers must be >= 1"):
        SplitRunner(0)


@settings(max_examples=200, deadline=None)
@given(lengths=st.lists(st.integers(1, 128), min_size=1, max_size=16), workers=st.integers(1, 4))
def test_length_groups_cover_every_row_once_sorted_and_balanced(lengths, workers):
    from edgecompute_ml._tasks.embeddings import length_groups

    groups = length_groups(lengths, workers)
    assert 1 <= len(groups) <= min(workers, len(lengths)) and all(groups)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    flat = [lengths[i] for g in groups for i in g]
    assert flat == sorted(flat)  # groups of similar length: consecutive in length order
    if len(groups) == 2:  # the best cut: no other split of the sorted rows has a larger smallest share of tokens
        ordered = sorted(lengths)
        best = min(max(sum(ordered[:i]), sum(ordered[i:])) for i in range(1, len(ordered)))
        assert max(sum(lengths[i] for i in g) for g in groups) == best


@settings(max_examples=200, deadline=None)
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=80))
def test_length_runs_cover_every_row_once_in_rising_runs(lengths):
    from edgecompute_ml._tasks.embeddings import RUN_ROWS, length_runs

    runs = length_runs(lengths)
    assert all(runs) and sorted(i for run in runs for i in run) == list(range(len(lengths)))
    flat = [lengths[i] for run in runs for i in run]
    assert flat == sorted(flat)
    for before, after in itertools.pairwise(runs):  # a run ends where the length rises, with enough rows
        assert len(before) >= RUN_ROWS and lengths[before[-1]] < lengths[after[0]]
    # no run could have been cut further: within a run, every rise comes before RUN_ROWS rows
    for run in runs:
        for at in range(RUN_ROWS - 1, len(run) - 1):
            assert lengths[run[at]] == lengths[run[at + 1]]


def test_split_embeddings_equal_one_padded_batch(tiny_bert, monkeypatch):
    from edgecompute_ml._runtime import cpu_split
    from edgecompute_ml._runtime.plan import ModelSource
    from edgecompute_ml._runtime.store import inspect_model, load_model
    from edgecompute_ml._tasks.embeddings import embed_texts

    lm = load_model(inspect_model(ModelSource("bert", str(tiny_bert))), "float32", "cpu")
    runner = SplitRunner(2)
    monkeypatch.setattr(cpu_split, "_shared", runner)
    texts = ["hi", "the quick brown fox jumps over the lazy dog again and again", "Paris", "a b c d e f",
             "one more sentence of middling length here"]
    try:
        split = embed_texts(lm, texts, split=True)
    finally:
        runner.close()
    torch.testing.assert_close(split, embed_texts(lm, texts), atol=1e-5, rtol=0)


def test_length_runs_give_every_text_its_own_vector(tiny_bert):
    from edgecompute_ml._runtime.plan import ModelSource
    from edgecompute_ml._runtime.store import inspect_model, load_model
    from edgecompute_ml._tasks.embeddings import embed_texts, length_runs

    lm = load_model(inspect_model(ModelSource("bert", str(tiny_bert))), "float32", "cpu")
    texts = ["x y", *[f"a b {c}" for c in "cdefghijk"], "a much longer text than all the others", "and one more"]
    lengths = [len(e.ids) for e in lm.tokenizer.encode_batch(texts, add_special_tokens=True)]
    runs = length_runs(lengths)
    assert len(runs) == 2 and len(runs[0]) == 10  # "x y" joins the nine of one length; the rest: a run
    for pooling in ("mean", "cls", "max"):
        alone = torch.cat([embed_texts(lm, [text], pooling) for text in texts])
        torch.testing.assert_close(embed_texts(lm, texts, pooling), alone, atol=1e-6, rtol=1e-6)
