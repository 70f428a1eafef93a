"""The vision tasks through the scheduler: image inputs, batching, zero-shot, detection, errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("PIL")

from PIL import Image

from edgecompute import Request
from edgecompute.errors import InvalidRequest
from edgecompute_ml.errors import InvalidImage

from .conftest import scheduler_for
from .tiny_vision import LABELS

pytestmark = pytest.mark.anyio


@pytest.fixture
def vision_executor(executor_for, tiny_vit, tiny_mobilenet, tiny_clip, tiny_yolos):
    def build(**config):
        return executor_for(models={"vit": str(tiny_vit), "mobilenet": str(tiny_mobilenet), "clip": str(tiny_clip),
                                    "yolos": str(tiny_yolos)}, **config)

    return build


def _array(seed: int, width: int = 48, height: int = 40) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _encoded(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


async def test_every_image_form_gives_the_same_labels(vision_executor):
    executor = vision_executor()
    array = _array(0)
    forms = [array, array.astype(np.float32) / 255, Image.fromarray(array), _encoded(array, "PNG"),
             np.dstack([array, np.full(array.shape[:2], 255, np.uint8)])]  # opaque RGBA
    async with scheduler_for(executor) as scheduler:
        results = [(await scheduler.run("ml/image-classification", form, params={"model": "vit", "top_k": 5})).outputs
                   for form in forms]
        jpeg = (await scheduler.run("ml/image-classification", _encoded(array, "JPEG"),
                                    params={"model": "vit"})).outputs
        grey = (await scheduler.run("ml/image-classification", array[:, :, 0], params={"model": "vit"})).outputs
    first = results[0]
    assert [r["label"] for r in first] != [] and {r["label"] for r in first} == set(LABELS)
    assert sum(r["score"] for r in first) == pytest.approx(1, abs=1e-5)
    assert [r["score"] for r in first] == sorted((r["score"] for r in first), reverse=True)
    for other in results[1:]:
        assert [r["label"] for r in other] == [r["label"] for r in first]
        assert [r["score"] for r in other] == pytest.approx([r["score"] for r in first], abs=1e-4)
    assert len(jpeg) == 5 and len(grey) == 5  # lossy and one-channel images are accepted too


async def test_lists_give_lists_and_top_k_limits(vision_executor):
    executor = vision_executor()
    async with scheduler_for(executor) as scheduler:
        many = (await scheduler.run("ml/image-classification", [_array(1), _array(2, 64, 30)],
                                    params={"model": "mobilenet", "top_k": 2})).outputs
        one = (await scheduler.run("ml/image-classification", _array(2, 64, 30),
                                   params={"model": "mobilenet", "top_k": 2, "batch": False})).outputs
    assert len(many) == 2 and all(len(r) == 2 for r in many)
    assert [r["label"] for r in many[1]] == [r["label"] for r in one]
    assert [r["score"] for r in many[1]] == pytest.approx([r["score"] for r in one], abs=1e-5)


async def test_concurrent_images_are_batched_and_equal_unbatched(vision_executor):
    executor = vision_executor(max_batch=8, max_delay_ms=20)
    images = [_array(i) for i in range(24)]
    async with scheduler_for(executor) as scheduler:
        alone = [(await scheduler.run("ml/image-classification", im, params={"model": "mobilenet", "batch": False,
                                                                              "top_k": 5})).outputs for im in images]
        handles = [scheduler.submit(Request("ml/image-classification", im, params={"model": "mobilenet", "top_k": 5}))
                   for im in images]
        together = [(await h.result()).outputs for h in handles]
        batcher = executor.batcher(executor.load("mobilenet"))  # the model's batcher, the one that ran them
    assert 1 < max(batcher.batch_sizes) <= 8
    for a, b in zip(alone, together, strict=True):
        assert [r["label"] for r in a] == [r["label"] for r in b]
        # batched convolutions sum in another order: float32 rounding, no more
        assert [r["score"] for r in a] == pytest.approx([r["score"] for r in b], abs=1e-4)


async def test_zero_shot_scores_the_candidate_labels_as_transformers_does(vision_executor, tiny_clip):
    import transformers

    executor = vision_executor()
    image = _array(5, 50, 40)
    labels = ["cat", "dog", "car on a road"]
    async with scheduler_for(executor) as scheduler:
        out = (await scheduler.run("ml/zero-shot-image-classification", image,
                                   params={"model": "clip", "candidate_labels": labels})).outputs
        many = (await scheduler.run("ml/zero-shot-image-classification", [image, _array(6)],
                                    params={"model": "clip", "candidate_labels": labels,
                                            "hypothesis_template": "a picture of {}"})).outputs
        with pytest.raises(InvalidRequest, match="candidate_labels"):
            await scheduler.run("ml/zero-shot-image-classification", image, params={"model": "clip"})
        with pytest.raises(InvalidRequest, match="hypothesis_template"):
            await scheduler.run("ml/zero-shot-image-classification", image,
                                params={"model": "clip", "candidate_labels": labels, "hypothesis_template": "x"})
    assert sorted(r["label"] for r in out) == sorted(labels)
    assert sum(r["score"] for r in out) == pytest.approx(1, abs=1e-5)
    assert len(many) == 2 and all(len(r) == 3 for r in many)
    # the reference: transformers' CLIP on its own preprocessing of the same image
    ref = transformers.CLIPModel.from_pretrained(tiny_clip).eval()
    processor = transformers.CLIPImageProcessorPil.from_pretrained(tiny_clip)
    lm = executor.load("clip")
    encodings = lm.tokenizer.encode_batch([f"This is a photo of {label}." for label in labels])
    longest = max(len(e.ids) for e in encodings)
    ids = torch.tensor([e.ids + [0] * (longest - len(e.ids)) for e in encodings])
    mask = torch.tensor([[1] * len(e.ids) + [0] * (longest - len(e.ids)) for e in encodings])
    with torch.no_grad():
        probs = ref(input_ids=ids, attention_mask=mask, **processor(images=Image.fromarray(image),
                                                                    return_tensors="pt")).logits_per_image.softmax(-1)
    expected = dict(zip(labels, probs[0].tolist(), strict=True))
    for r in out:
        assert r["score"] == pytest.approx(expected[r["label"]], abs=1e-5)


async def test_object_detection_returns_pixel_boxes_after_nms(vision_executor):
    executor = vision_executor()
    image = _array(7, 90, 60)
    async with scheduler_for(executor) as scheduler:
        everything = (await scheduler.run("ml/object-detection", image,
                                          params={"model": "yolos", "threshold": 0.0, "iou_threshold": 1.0})).outputs
        kept = (await scheduler.run("ml/object-detection", image,
                                    params={"model": "yolos", "threshold": 0.0, "iou_threshold": 0.3})).outputs
        strict = (await scheduler.run("ml/object-detection", [image], params={"model": "yolos", "threshold": 0.99})
                  ).outputs
    assert len(everything) == 6  # one per detection token
    assert 0 < len(kept) <= len(everything)
    assert strict == [[]] or all(d["score"] > 0.99 for d in strict[0])
    for d in everything:
        box = d["box"]
        assert 0 <= box["xmin"] <= box["xmax"] <= 90 and 0 <= box["ymin"] <= box["ymax"] <= 60
        assert d["label"] in LABELS[:3]
    from edgecompute_ml._tasks.detection import box_iou

    for label in {d["label"] for d in kept}:
        same = torch.tensor([[d["box"][k] for k in ("xmin", "ymin", "xmax", "ymax")] for d in kept
                             if d["label"] == label])
        iou = box_iou(same, same) - torch.eye(len(same))
        assert iou.max() <= 0.3 + 1e-6


@pytest.mark.parametrize(("image", "match"), [
    (b"not an image at all", "cannot decode"),
    (b"", "empty bytes"),
    (np.zeros((4, 4, 2), np.uint8), "not an image"),
    (np.zeros((0, 4, 3), np.uint8), "no pixels"),
    (np.full((4, 4, 3), 2.0, np.float32), r"\[0, 1\]"),
    (np.full((4, 4, 3), np.nan, np.float32), "NaN"),
    (np.zeros((4, 4, 3), np.int32), "dtype int32"),
    ("a string", "not str"),
    ([], "empty list"),
])
async def test_bad_images_are_invalid_requests_naming_the_problem(vision_executor, image, match):
    executor = vision_executor()
    async with scheduler_for(executor) as scheduler:
        with pytest.raises(InvalidImage, match=match):
            await scheduler.run("ml/image-classification", image, params={"model": "vit"})
    assert issubclass(InvalidImage, InvalidRequest)


async def test_truncated_png_is_an_invalid_image(vision_executor):
    data = _encoded(_array(3), "PNG")
    executor = vision_executor()
    async with scheduler_for(executor) as scheduler:
        with pytest.raises(InvalidImage, match="inputs"):
            await scheduler.run("ml/image-classification", data[: len(data) // 2], params={"model": "vit"})
        with pytest.raises(InvalidImage, match=r"inputs\[1\]"):
            await scheduler.run("ml/image-classification", [data, b"junk"], params={"model": "vit"})


async def test_vision_requests_are_checked_at_submit(vision_executor):
    executor = vision_executor()
    async with scheduler_for(executor) as scheduler:
        with pytest.raises(InvalidRequest, match="serves ml/zero-shot-image-classification"):
            scheduler.submit(Request("ml/image-classification", _array(0), params={"model": "clip"}))
        with pytest.raises(InvalidRequest, match="serves ml/image-classification"):
            scheduler.submit(Request("ml/object-detection", _array(0), params={"model": "vit"}))
        with pytest.raises(InvalidRequest, match="unknown parameter"):
            await scheduler.run("ml/image-classification", _array(0), params={"model": "vit", "topk": 2})
        with pytest.raises(InvalidRequest, match="top_k"):
            await scheduler.run("ml/image-classification", _array(0), params={"model": "vit", "top_k": 0})
        with pytest.raises(InvalidRequest, match="threshold"):
            await scheduler.run("ml/object-detection", _array(0), params={"model": "yolos", "threshold": 2})
    needs = executor.requirements(Request("ml/image-classification", _array(0), params={"model": "vit"}))
    assert needs.cpu == pytest.approx(1 / 16) and needs.memory_mb > 0
