"""What one request may make the host do: operator ceilings on every request-controlled size.

A request is untrusted (it may come from a remote client through the gateway); the operator's
``[executors.ml]`` table is trusted. Each limit here is an operator setting with a default; the
request parameters and inputs it bounds are checked against it before any work or allocation,
and a breach is an ``InvalidRequest`` whose message names the request parameter (or input) and the
operator setting that caps it, with its value.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from edgecompute.errors import ConfigError, InvalidRequest

__all__ = ["LIMIT_KEYS", "Limits"]

# setting -> (default, largest value an operator may configure): the hard caps keep a typo in the
# config (an extra zero) from reopening what the limit closes
_SPECS: dict[str, tuple[int, int]] = {
    "max_new_tokens_limit": (4096, 1 << 17),
    "max_texts": (256, 1 << 16),
    "max_text_chars": (100_000, 10_000_000),
    "max_images": (64, 4096),
    "max_image_pixels": (64_000_000, 256_000_000),
    "max_audio_seconds": (1800, 86_400),
    "max_candidate_labels": (256, 65_536),
    "max_stop_strings": (16, 1024),
    "max_request_memory_mb": (4096, 1 << 20),
}
LIMIT_KEYS = frozenset(_SPECS)


@attrs.frozen
class Limits:
    """The ceilings, read from the ``[executors.ml]`` table (see docs/ml.md, "Limits")."""

    max_new_tokens_limit: int = _SPECS["max_new_tokens_limit"][0]
    max_texts: int = _SPECS["max_texts"][0]
    max_text_chars: int = _SPECS["max_text_chars"][0]
    max_images: int = _SPECS["max_images"][0]
    max_image_pixels: int = _SPECS["max_image_pixels"][0]
    max_audio_seconds: int = _SPECS["max_audio_seconds"][0]
    max_candidate_labels: int = _SPECS["max_candidate_labels"][0]
    max_stop_strings: int = _SPECS["max_stop_strings"][0]
    max_request_memory_mb: int = _SPECS["max_request_memory_mb"][0]

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Limits:
        values: dict[str, int] = {}
        for key, (_, cap) in _SPECS.items():
            if key not in config:
                continue
            value = config[key]
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= cap:
                raise ConfigError(f"executors.ml: {key} must be an integer in [1, {cap}], not {value!r}")
            values[key] = value
        return cls(**values)

    # -- checks (each raises InvalidRequest naming what to change) ---------------------------------

    def texts(self, texts: Any, what: str) -> None:
        """A list of strings: how many (``max_texts``) and how long each is (``max_text_chars``)."""
        if len(texts) > self.max_texts:
            raise InvalidRequest(f"{what}: {len(texts)} texts exceed the limit of {self.max_texts} per request "
                                 "(executors.ml max_texts); send them in several requests")
        for i, text in enumerate(texts):
            self.text(text, f"{what}[{i}]")

    def text(self, text: str, what: str) -> None:
        if len(text) > self.max_text_chars:
            raise InvalidRequest(f"{what}: {len(text)} characters exceed the limit of {self.max_text_chars} "
                                 "(executors.ml max_text_chars)")

    def new_tokens(self, value: int, what: str = "max_new_tokens") -> None:
        if value > self.max_new_tokens_limit:
            raise InvalidRequest(f"{what} {value} exceeds the limit of {self.max_new_tokens_limit} "
                                 "(executors.ml max_new_tokens_limit)")

    def image_count(self, count: int, what: str = "inputs") -> None:
        if count > self.max_images:
            raise InvalidRequest(f"{what}: {count} images exceed the limit of {self.max_images} per request "
                                 "(executors.ml max_images); send them in several requests")

    def memory(self, task: str, working_bytes: float) -> None:
        """The working set a request would make the host allocate, against ``max_request_memory_mb``."""
        mb = working_bytes / 2**20
        if mb > self.max_request_memory_mb:
            raise InvalidRequest(f"ml/{task}: this request needs about {mb:.0f} MB of working memory, more than "
                                 f"the limit of {self.max_request_memory_mb} MB per request (executors.ml "
                                 "max_request_memory_mb); send fewer or smaller inputs")
