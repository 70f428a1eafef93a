"""The ml executor through the scheduler: discovery, tasks, streaming, cancellation, batching."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading

import pytest
import torch

from edgecompute import Request
from edgecompute.errors import ConfigError, InvalidRequest
from edgecompute_ml._tasks.generation import GenerationParams, build_prompt_ids, generate
from edgecompute_ml.errors import ModelError, UnknownModel

from .conftest import scheduler_for

pytestmark = pytest.mark.anyio


def test_plugin_registers_ml_without_importing_torch():
    code = (
        "import sys\n"
        "from edgecompute import Registry\n"
        "r = Registry.discover(settings={'ml': {'device': 'cpu', 'threads': 1}})\n"
        "assert 'ml' in r.names(), r.names()\n"
        "ex = r.get('ml')\n"
        "assert ex.devices.threads == 1\n"
        "names = {a.name for a in ex.algorithms()}\n"
        "assert {'embeddings', 'text-generation', 'image-classification', 'zero-shot-image-classification',"
        " 'object-detection', 'speech-recognition'} <= names, names\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout


def test_bad_config_is_a_config_error():
    from edgecompute_ml.executor import MLExecutor

    with pytest.raises(ConfigError, match="unknown key"):
        MLExecutor(config={"modles": {}})
    with pytest.raises(ConfigError, match="device must be auto, cpu, cuda, cuda:N or mps, not 'tpu'"):
        MLExecutor(config={"device": "tpu"})
    with pytest.raises(ConfigError, match="max_batch must be an integer >= 1, not 0"):
        MLExecutor(config={"max_batch": 0})


async def test_text_generation_streams_pieces_that_make_the_text(executor_for):
    executor = executor_for()
    async with scheduler_for(executor) as scheduler:
        handle = scheduler.submit(Request("ml/text-generation", "the quick brown fox",
                                          params={"max_new_tokens": 20}))
        chunks = [chunk async for chunk in handle.stream()]
        response = await handle.result()
    out = response.outputs
    assert out["finish_reason"] in ("length", "stop")
    assert "".join(chunks) == out["text"]
    assert len(chunks) > 1
    assert out["usage"]["completion_tokens"] == len(out["tokens"]) <= 20
    assert "load" in response.timings and "generate" in response.timings


async def test_chat_messages_use_the_chat_template(executor_for):
    executor = executor_for()
    lm = executor.load("llama")
    ids = build_prompt_ids(lm, [{"role": "user", "content": "hello"}])
    assert lm.tokenizer.decode(ids, skip_special_tokens=False) == \
        "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    async with scheduler_for(executor) as scheduler:
        response = await scheduler.run("ml/text-generation", {"messages": [{"role": "user", "content": "hello"}]},
                                       params={"max_new_tokens": 5, "stream": False})
    assert response.outputs["usage"]["prompt_tokens"] == len(ids)
    with pytest.raises(InvalidRequest, match="role"):
        build_prompt_ids(lm, [{"content": "x"}])


async def test_sampling_is_reproducible_with_a_seed_and_top_k_1_is_greedy(executor_for):
    executor = executor_for()
    params = {"max_new_tokens": 16, "temperature": 1.5, "top_p": 0.9, "seed": 7}
    async with scheduler_for(executor) as scheduler:
        a = await scheduler.run("ml/text-generation", "hello world", params=params)
        b = await scheduler.run("ml/text-generation", "hello world", params=params)
        c = await scheduler.run("ml/text-generation", "hello world", params={**params, "seed": 8})
        greedy = await scheduler.run("ml/text-generation", "hello world", params={"max_new_tokens": 16})
        top1 = await scheduler.run("ml/text-generation", "hello world",
                                   params={"max_new_tokens": 16, "temperature": 2.0, "top_k": 1, "seed": 1})
    assert a.outputs["tokens"] == b.outputs["tokens"]
    assert a.outputs["tokens"] != c.outputs["tokens"]
    assert top1.outputs["tokens"] == greedy.outputs["tokens"]


def test_stop_strings_cut_the_text_and_are_never_streamed(executor_for):
    lm = executor_for().load("llama")
    lm.eos_token_ids = frozenset()
    ids = build_prompt_ids(lm, "the quick brown fox")
    full = generate(lm, ids, GenerationParams(max_new_tokens=30))["text"]
    assert len(full) > 6
    stop = full[3:6]
    pieces: list[str] = []
    out = generate(lm, ids, GenerationParams(max_new_tokens=30, stop=(stop,)), on_text=pieces.append)
    assert out["finish_reason"] == "stop"
    assert out["text"] == full[:full.index(stop)]
    assert "".join(pieces) == out["text"]


def test_generation_polls_cancellation_every_token(executor_for):
    lm = executor_for().load("llama")
    lm.eos_token_ids = frozenset()
    calls = []

    def cancelled():
        calls.append(1)
        return len(calls) > 5

    out = generate(lm, build_prompt_ids(lm, "hello"), GenerationParams(max_new_tokens=100), cancelled=cancelled)
    assert out["finish_reason"] == "cancelled"
    assert len(out["tokens"]) == 5


async def test_cancelling_a_streaming_task_stops_generation_promptly(executor_for, tmp_path):
    from .tiny import make_llama

    # a model with a long context, so that an uncancelled generation would run for a long time
    folder = make_llama(tmp_path / "long")
    import json

    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = 100_000
    (folder / "config.json").write_text(json.dumps(config))
    executor = executor_for(models={"long": str(folder)}, max_new_tokens_limit=50_000)
    lm = executor.load("long")
    lm.eos_token_ids = frozenset()
    async with scheduler_for(executor) as scheduler:
        handle = scheduler.submit(Request("ml/text-generation", "hello",
                                          params={"model": "long", "max_new_tokens": 50_000}))
        stream = handle.stream()
        await stream.__anext__()
        assert handle.cancel()
        await stream.aclose()
        loop = asyncio.get_running_loop()
        start = loop.time()
        while not scheduler.idle:  # the worker thread must notice and return
            await asyncio.sleep(0.01)
            assert loop.time() - start < 5, "generation did not stop after cancellation"


async def test_embeddings_normalised_as_the_folder_declares(executor_for):
    executor = executor_for()
    async with scheduler_for(executor) as scheduler:
        one = (await scheduler.run("ml/embeddings", "hello world")).outputs
        many = (await scheduler.run("ml/embeddings", ["hello world", "the lazy dog"])).outputs
        raw = (await scheduler.run("ml/embeddings", "hello world", params={"normalize": False})).outputs
        cls = (await scheduler.run("ml/embeddings", "hello world", params={"pooling": "cls"})).outputs
    assert len(one) == 48 and abs(sum(v * v for v in one) - 1) < 1e-5
    assert len(many) == 2
    torch.testing.assert_close(torch.tensor(many[0]), torch.tensor(one), atol=1e-5, rtol=0)
    assert abs(sum(v * v for v in raw) - 1) > 1e-3
    assert cls != one


async def test_concurrent_embeddings_are_batched_and_equal_unbatched(executor_for):
    from .tiny import CORPUS

    executor = executor_for(max_batch=8, max_delay_ms=20)
    texts = [f"{CORPUS[i % len(CORPUS)]} {i}" for i in range(24)]
    async with scheduler_for(executor) as scheduler:
        alone = [(await scheduler.run("ml/embeddings", t, params={"batch": False})).outputs for t in texts]
        handles = [scheduler.submit(Request("ml/embeddings", t)) for t in texts]
        together = [(await h.result()).outputs for h in handles]
        batcher = executor.batcher(executor.load("bert"))  # the model's batcher, the one that ran them
    assert max(batcher.batch_sizes) > 1
    assert max(batcher.batch_sizes) <= 8
    torch.testing.assert_close(torch.tensor(together), torch.tensor(alone), atol=1e-5, rtol=0)


async def test_requests_are_checked_at_submit(executor_for):
    executor = executor_for()
    async with scheduler_for(executor) as scheduler:
        with pytest.raises(UnknownModel, match="known models: bert, llama"):
            scheduler.submit(Request("ml/text-generation", "x", params={"model": "nope"}))
        with pytest.raises(InvalidRequest, match="serves ml/embeddings"):
            scheduler.submit(Request("ml/text-generation", "x", params={"model": "bert"}))
        with pytest.raises(InvalidRequest, match="unknown parameter"):
            await scheduler.run("ml/text-generation", "x", params={"max_tokens": 3})
        with pytest.raises(InvalidRequest, match="temperature"):
            await scheduler.run("ml/text-generation", "x", params={"temperature": -1})
        with pytest.raises(InvalidRequest, match="list of strings"):
            await scheduler.run("ml/embeddings", [1, 2])
    needs = executor.requirements(Request("ml/embeddings", "x"))
    assert needs.cpu == pytest.approx(1 / 16) and needs.gpu_memory_mb == 0
    assert executor.requirements(Request("ml/text-generation", "x")).memory_mb > 0


def test_cache_loads_once_under_concurrency_and_evicts_lru(executor_for, tiny_llama):
    executor = executor_for(models={"llama2": str(tiny_llama)})
    size = executor.estimate_bytes("llama")
    executor.cache.budget_bytes = int(size * 1.5)  # room for one llama at a time
    results = []
    threads = [threading.Thread(target=lambda: results.append(executor.load("llama"))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert executor.cache.loads["llama"] == 1
    assert all(r is results[0] for r in results)
    executor.load("llama2")
    assert executor.cache.loaded() == ["llama2"]  # llama was least recently used and evicted
    assert executor.unload("llama2") and executor.cache.loaded() == []
    assert not executor.unload("llama2")
    executor.cache.budget_bytes = size // 2
    with pytest.raises(ModelError, match="more than the model cache's whole budget"):
        executor.load("llama")


def test_failed_load_is_reported_to_every_waiter(executor_for, tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{")
    executor = executor_for(models={"broken": str(tmp_path / "broken")})
    with pytest.raises(ModelError, match="invalid JSON"):
        executor.load("broken")


async def test_gpu_requests_larger_than_the_device_fail_at_once(executor_for):
    executor = executor_for(device="cuda:0")
    executor.devices.gpu_total_mb = lambda: 0.01  # a (pretend) GPU far too small for the model
    executor.devices._device = "cuda:0"
    async with scheduler_for(executor) as scheduler:
        from edgecompute.errors import InfeasibleRequest

        with pytest.raises(InfeasibleRequest, match="GPU memory"):
            scheduler.submit(Request("ml/embeddings", "x"))


def test_tiny_top_p_is_greedy_and_sampling_params_are_validated(executor_for):
    lm = executor_for().load("llama")
    lm.eos_token_ids = frozenset()
    ids = build_prompt_ids(lm, "hello world")
    greedy = generate(lm, ids, GenerationParams(max_new_tokens=12))["tokens"]
    nucleus = generate(lm, ids, GenerationParams(max_new_tokens=12, temperature=1.0, top_p=1e-6, seed=3))["tokens"]
    assert nucleus == greedy
    for bad in ({"top_p": 1.5}, {"top_k": -1}, {"seed": "x"}, {"stop": [""]}, {"max_new_tokens": 1.5}):
        with pytest.raises(InvalidRequest):
            GenerationParams.from_params(bad)


def test_chat_template_file_and_generation_config_eos(tiny_llama, tmp_path, executor_for):
    import json
    import shutil

    folder = shutil.copytree(tiny_llama, tmp_path / "m")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    template = config.pop("chat_template")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "chat_template.jinja").write_text(template.replace("<|im_start|>", "<s><|im_start|>"))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 4]}))
    lm = executor_for(models={"m": str(folder)}).load("m")
    assert lm.eos_token_ids >= {2, 4}
    text = lm.tokenizer.decode(build_prompt_ids(lm, [{"role": "user", "content": "hi"}]), skip_special_tokens=False)
    assert text.startswith("<s><|im_start|>user\nhi")
