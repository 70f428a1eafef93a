"""Models load in a thread of their own that has ended when the load returns (executor._load):
torch's OpenMP runtime keeps a worker pool for every live thread that ran a parallel region, and
more pooled threads than cores make every parallel region wake sleeping workers."""

from __future__ import annotations

import threading

import pytest

from edgecompute_ml._runtime import store
from edgecompute_ml.errors import ModelError
from edgecompute_ml.executor import MLExecutor


def test_a_load_runs_in_a_thread_that_ends_with_it(tiny_bert, monkeypatch):
    seen: list[threading.Thread] = []
    real = store.load_model

    def recording(*args, **kwargs):
        seen.append(threading.current_thread())
        return real(*args, **kwargs)

    monkeypatch.setattr(store, "load_model", recording)
    executor = MLExecutor(config={"models": {"bert": str(tiny_bert)}, "device": "cpu", "demo_models": False})
    lm = executor.load("bert")
    assert lm.task == "embeddings" and len(seen) == 1
    assert seen[0] is not threading.current_thread() and seen[0].name == "ml-load"
    assert not seen[0].is_alive()


def test_a_failed_load_raises_in_the_caller(tiny_bert, monkeypatch):
    def failing(*args, **kwargs):
        raise ModelError("broken weights")

    monkeypatch.setattr(store, "load_model", failing)
    executor = MLExecutor(config={"models": {"bert": str(tiny_bert)}, "device": "cpu", "demo_models": False})
    with pytest.raises(ModelError, match="broken weights"):
        executor.load("bert")
