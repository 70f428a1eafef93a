"""An LRU cache of loaded models under a memory budget.

The size of a model is estimated from its headers before loading; models least recently used
are dropped until the new one fits. Concurrent first requests for a model load it once (the
others wait for that load). Thread-safe: loads run on worker threads.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from typing import Any

from ..errors import ModelError

__all__ = ["ModelCache"]


class ModelCache:
    def __init__(self, budget_bytes: int, estimate: Callable[[str], int], load: Callable[[str], Any]) -> None:
        self.budget_bytes = budget_bytes
        self._estimate = estimate
        self._load = load
        self._models: collections.OrderedDict[str, tuple[Any, int]] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Event] = {}
        self._errors: dict[str, BaseException] = {}
        #: How many times each model was really loaded (for tests and stats).
        self.loads: collections.Counter[str] = collections.Counter()
        self.load_seconds: dict[str, float] = {}

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(size for _, size in self._models.values())

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._models)

    def peek(self, name: str) -> Any | None:
        with self._lock:
            entry = self._models.get(name)
            if entry is not None:
                self._models.move_to_end(name)
                return entry[0]
            return None

    def get(self, name: str) -> Any:
        """The loaded model, loading it (once, even under concurrent calls) if needed."""
        while True:
            with self._lock:
                entry = self._models.get(name)
                if entry is not None:
                    self._models.move_to_end(name)
                    return entry[0]
                event = self._loading.get(name)
                if event is None:
                    event = self._loading[name] = threading.Event()
                    self._errors.pop(name, None)
                    break
            event.wait()
            with self._lock:
                error = self._errors.get(name)
                if error is not None and name not in self._models:
                    raise error
        try:
            size = self._estimate(name)
            if size > self.budget_bytes:
                raise ModelError(f"model {name!r} needs about {size / 2**20:.0f} MB, more than the model cache's "
                                 f"whole budget ({self.budget_bytes / 2**20:.0f} MB, memory_budget_mb)")
            with self._lock:
                while self._models and sum(s for _, s in self._models.values()) + size > self.budget_bytes:
                    self._models.popitem(last=False)
            start = time.perf_counter()
            model = self._load(name)
            self.load_seconds[name] = time.perf_counter() - start
            with self._lock:
                self._models[name] = (model, size)
                self.loads[name] += 1
            return model
        except BaseException as exc:
            with self._lock:
                self._errors[name] = exc
            raise
        finally:
            with self._lock:
                self._loading.pop(name, None)
            event.set()

    def unload(self, name: str) -> bool:
        with self._lock:
            return self._models.pop(name, None) is not None

    def clear(self) -> None:
        with self._lock:
            self._models.clear()
