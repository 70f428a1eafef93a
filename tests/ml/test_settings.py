"""The ``[executors.ml]`` table (docs/ml.md, "Configuration"): every setting is checked once, as a
``ConfigError`` naming the key, before the executor starts anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgecompute.errors import ConfigError
from edgecompute_ml._runtime.plan import ModelSource
from edgecompute_ml.settings import MLSettings


def test_a_table_is_read_into_typed_settings(tmp_path):
    settings = MLSettings.from_mapping({
        "device": "CPU", "threads": 2, "max_batch": 4, "max_delay_ms": 0, "batching": False,
        "models": {"a": str(tmp_path), "b": {"path": str(tmp_path), "dtype": "int8"}},
        "default_models": {"embeddings": "a"}, "max_texts": 3, "compile_cache_dir": "~/cc",
        "enabled": True, "max_concurrency": 2,  # the core's keys pass through
    })
    assert settings.device == "cpu" and settings.threads == 2 and settings.max_batch == 4
    assert settings.models == (ModelSource("a", str(tmp_path)), ModelSource("b", str(tmp_path), "int8"))
    assert settings.limits.max_texts == 3
    assert settings.compile_cache_dir == Path("~/cc").expanduser()
    assert MLSettings.from_mapping(None) == MLSettings()
    assert MLSettings(memory_budget_mb=512).budget_mb() == 512.0 and MLSettings().budget_mb() > 0


@pytest.mark.parametrize(("table", "message"), [
    ({"device": "tpu"}, "device must be auto, cpu, cuda, cuda:N or mps, not 'tpu'"),
    ({"device": "cuda:x"}, "device must be"),
    ({"dtype": "complex64"}, "dtype must be one of float32, float16, bfloat16, auto"),
    ({"threads": 0}, "threads must be an integer >= 1"),
    ({"threads": True}, "threads must be an integer >= 1"),
    ({"memory_budget_mb": 0}, "memory_budget_mb must be a finite number > 0"),
    ({"memory_budget_mb": float("inf")}, "memory_budget_mb must be a finite number > 0"),
    ({"max_batch": 0}, "max_batch must be an integer >= 1"),
    ({"max_batch": 2.5}, "max_batch must be an integer >= 1"),
    ({"max_delay_ms": -1}, "max_delay_ms must be a finite number >= 0"),
    ({"batching": "yes"}, "batching must be true or false"),
    ({"demo_models": 1}, "demo_models must be true or false"),
    ({"compile": "no"}, "compile must be true or false"),
    ({"compile_cache_dir": 3}, "compile_cache_dir must be a path"),
    ({"default_models": {"embeddings": 3}}, "default_models must be a table of task = model name"),
    ({"models": ["a"]}, "models must be a table"),
    ({"max_texts": 0}, "max_texts must be an integer in"),
    ({"colour": "blue"}, "unknown key.*colour.*valid: batching"),
])
def test_each_bad_setting_is_a_config_error_naming_it(table, message):
    with pytest.raises(ConfigError, match=message):
        MLSettings.from_mapping(table)
