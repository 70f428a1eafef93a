"""The captured (torch.compile) decode step: the eager tokens, compiled code reused by a second
process (counted by inductor's cache counters), eager fallback without a compiler, and quantized
weights that stay packed (no float copy anywhere, counted by dtype over every live tensor)."""

from __future__ import annotations

import gc
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gguf")

from edgecompute_ml._runtime.capture import CaptureSettings, DecodeCapture, capacity_for  # noqa: E402
from edgecompute_ml._runtime.plan import ModelSource  # noqa: E402
from edgecompute_ml._runtime.store import inspect_model, load_model  # noqa: E402
from edgecompute_ml._tasks.generation import GenerationParams, generate  # noqa: E402

from .tiny_families import make_decoder, write_family_gguf  # noqa: E402

PROMPTS = ([5, 6, 7], [40, 41, 42, 43, 44, 45, 46, 47, 48])
PARAMS = GenerationParams(max_new_tokens=20)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    made = {}

    def get(name, qtype=None):
        key = (name, qtype)
        if key not in made:
            folder = make_decoder(tmp_path_factory.mktemp(name), name)
            if qtype is not None:
                path = tmp_path_factory.mktemp(f"{name}-gguf") / f"{name}-{qtype}.gguf"
                write_family_gguf(folder, path, qtype)
                folder = path
            made[key] = folder
        return made[key]
    return get


def _load(path, settings=None):
    lm = load_model(inspect_model(ModelSource("m", str(path), None)), "float32", "cpu")
    lm.eos_token_ids = frozenset()
    if settings is not None:
        lm.model.capture = DecodeCapture(lm.model.decode_step, settings, "m")
    return lm


def _counters():
    from torch._dynamo.utils import counters

    return dict(counters["inductor"]), dict(counters["stats"])


def test_capacity_is_a_power_of_two_within_the_model():
    assert capacity_for(5, 256) == 128 and capacity_for(129, 4096) == 256 and capacity_for(3000, 2048) == 3000
    assert capacity_for(200, 160) == 200 and capacity_for(100, 160) == 128


@pytest.mark.parametrize(("name", "qtype"), [("llama3", "Q4_1"), ("gemma2", None), ("phi3", None)])
def test_captured_decode_gives_the_eager_tokens(models, tmp_path, name, qtype):
    """Q4_1 packed kernels inside the graph; Gemma 2's soft-capping and sliding window (4 keys,
    so the mask matters); Phi-3's partial LongRoPE whose factors follow the generation's length,
    not the rounded-up capacity."""
    path = models(name, qtype)
    eager, captured = _load(path), _load(path, CaptureSettings(True, tmp_path / "cache"))
    graphs = _counters()[1].get("unique_graphs", 0)
    for prompt in PROMPTS:
        tokens = generate(eager, prompt, PARAMS)["tokens"]
        assert generate(captured, prompt, PARAMS)["tokens"] == tokens and len(set(tokens)) > 3
    assert captured.model.capture.fallback is None
    assert _counters()[1].get("unique_graphs", 0) > graphs  # the step really ran as a compiled graph


_CHILD = """
import json, sys
import torch
torch.set_num_threads(1)
from edgecompute_ml._runtime.capture import CaptureSettings, DecodeCapture
from edgecompute_ml._runtime.plan import ModelSource
from edgecompute_ml._runtime.store import inspect_model, load_model
from edgecompute_ml._tasks.generation import GenerationParams, generate
from torch._dynamo.utils import counters
lm = load_model(inspect_model(ModelSource("m", sys.argv[1], None)), "float32", "cpu")
lm.eos_token_ids = frozenset()
lm.model.capture = DecodeCapture(lm.model.decode_step, CaptureSettings(True, sys.argv[2]), "m")
tokens = generate(lm, [5, 6, 7], GenerationParams(max_new_tokens=12))["tokens"]
print(json.dumps({"tokens": tokens, "fallback": lm.model.capture.fallback, **counters["inductor"]}))
"""


def test_a_second_process_loads_the_compiled_step_from_the_cache(models, tmp_path):
    path = models("llama3", "Q4_0")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHINDUCTOR")}

    def child():
        done = subprocess.run([sys.executable, "-c", _CHILD, str(path), str(tmp_path / "cache")], env=env,
                              capture_output=True, text=True, timeout=600, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])

    first, second = child(), child()
    assert first["fallback"] is None and second["fallback"] is None
    assert first.get("fxgraph_cache_miss", 0) >= 1 and first.get("fxgraph_cache_hit", 0) == 0
    assert second.get("fxgraph_cache_miss", 0) == 0 and second.get("fxgraph_cache_hit", 0) >= 1
    assert second["tokens"] == first["tokens"]
    assert any((tmp_path / "cache").rglob("*.so"))  # the compiled code lives in the operator's folder


@pytest.mark.parametrize("cxx", ["/nonexistent/g++", "/bin/false"])
def test_without_a_working_compiler_the_step_runs_eager(models, tmp_path, caplog, cxx):
    """No compiler at all (found by looking), and one that fails (found by compiling: inductor's
    caches are off, so that nothing compiled earlier hides the failure)."""
    from torch._inductor import config

    path = models("qwen3", None)
    eager = _load(path)
    captured = _load(path, CaptureSettings(True, tmp_path / "cache"))
    torch._dynamo.reset()
    with config.patch({"cpp.cxx": (None, cxx), "force_disable_caches": True}), \
            caplog.at_level(logging.WARNING, logger="edgecompute_ml.capture"):
        for prompt in PROMPTS:
            assert generate(captured, prompt, PARAMS)["tokens"] == generate(eager, prompt, PARAMS)["tokens"]
    assert captured.model.capture.fallback is not None
    assert ("compiler" if cxx.startswith("/nonexistent") else "torch.compile failed") in captured.model.capture.fallback
    assert len([r for r in caplog.records if "runs eager" in r.getMessage()]) == 1  # logged once, not per step
    torch._dynamo.reset()


def test_capture_off_is_eager():
    capture = DecodeCapture(lambda *a: 1 / 0, CaptureSettings(False, Path("unused")), "m")
    assert not capture.active and capture(None, None, None, None, None) is None


def _float_bytes_alive():
    """Bytes of every live float32/float16/bfloat16 tensor in this process, each storage once."""
    seen, total = set(), 0
    for obj in gc.get_objects():
        # real tensors only (the compiler's fake tensors hold no memory)
        if type(obj) in (torch.Tensor, torch.nn.Parameter) and obj.is_floating_point() and not obj.is_meta:
            ptr = obj.untyped_storage().data_ptr()
            if ptr not in seen:
                seen.add(ptr)
                total += obj.untyped_storage().nbytes()
    return total


def test_packed_weights_have_no_float_copy_after_captured_generation(models, tmp_path):
    path = models("llama3", "Q4_0")
    gc.collect()
    before = _float_bytes_alive()
    lm = _load(path, CaptureSettings(True, tmp_path / "cache"))
    generate(lm, PROMPTS[1], PARAMS)
    gc.collect()
    added = _float_bytes_alive() - before
    weights = sum(4 * n * k for n, k in _matrix_shapes(lm.model))
    # what float32 data there is: norms, rotary tables, the KV cache; not the weights (a quarter
    # of their float32 size would already be more than all of it)
    assert 0 < added < weights / 4, (added, weights)


def _matrix_shapes(model):
    for value in [model.embed] + [getattr(layer, s) for layer in model.layers for s in ("qkv", "o", "gate_up",
                                                                                          "down")]:
        yield value.shape


def test_the_executor_captures_decoders_as_configured(models, tmp_path):
    from edgecompute_ml.executor import MLExecutor

    path = str(models("llama3", None))
    on = MLExecutor(config={"models": {"t": path}, "demo_models": False, "compile": True,
                            "compile_cache_dir": str(tmp_path)})
    off = MLExecutor(config={"models": {"t": path}, "demo_models": False, "compile": False})
    unset = MLExecutor(config={"models": {"t": path}, "demo_models": False})
    captured, eager = on.load("t").model.capture, off.load("t").model.capture
    assert captured.active and captured.settings.cache_dir == tmp_path
    assert not eager.active and "compile = false" in eager.fallback
    assert not unset.load("t").model.capture.active  # opt-in: no first generation stalls by default
