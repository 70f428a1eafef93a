"""Our vision models and preprocessing against transformers, on tiny random models (f32)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
PIL = pytest.importorskip("PIL")

from PIL import Image  # noqa: E402

from edgecompute_ml._preprocessing.image import decode_image  # noqa: E402
from edgecompute_ml._runtime.plan import ModelSource  # noqa: E402
from edgecompute_ml._runtime.store import inspect_model, load_model  # noqa: E402
from edgecompute_ml._tasks.detection import postprocess  # noqa: E402


def _load(folder, dtype="float32"):
    return load_model(inspect_model(ModelSource("m", str(folder))), dtype, "cpu")


def _photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth random RGB picture (gradients plus noise), like a photo rather than pure noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / width, y / height, (x + y) / (width + height)], -1) * 200
    return Image.fromarray(np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8))


def test_vit_logits_match_transformers(tiny_vit):
    lm = _load(tiny_vit)
    ref = transformers.ViTForImageClassification.from_pretrained(tiny_vit).eval()
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = ref(pixels).logits
    assert expected.std() > 0.1  # the test model's outputs are not all alike
    torch.testing.assert_close(lm.model.forward(pixels), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("fixture", ["tiny_mobilenet", "tiny_mobilenet_symmetric"])
@pytest.mark.parametrize("size", [(64, 64), (67, 90)])  # odd sizes exercise TensorFlow "same" padding
def test_mobilenet_logits_match_transformers(fixture, size, request):
    folder = request.getfixturevalue(fixture)
    lm = _load(folder)
    ref = transformers.MobileNetV2ForImageClassification.from_pretrained(folder).eval()
    pixels = torch.randn(2, 3, *size)
    with torch.no_grad():
        expected = ref(pixels).logits
    assert (expected[0] - expected[1]).abs().max() > 0.1  # the output depends on the input
    torch.testing.assert_close(lm.model.forward(pixels), expected, atol=1e-4, rtol=1e-4)


def test_clip_logits_match_transformers(tiny_clip):
    lm = _load(tiny_clip)
    ref = transformers.CLIPModel.from_pretrained(tiny_clip).eval()
    texts = ["a photo of a cat", "a dog", "this is a photo of a tree on a road"]
    encodings = lm.tokenizer.encode_batch(texts)
    longest = max(len(e.ids) for e in encodings)
    eos = lm.model.config.eos_token_id
    ids = torch.tensor([e.ids + [eos] * (longest - len(e.ids)) for e in encodings])
    mask = torch.tensor([[1] * len(e.ids) + [0] * (longest - len(e.ids)) for e in encodings])
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits_per_image
    ours = lm.model.logits(lm.model.image_embeds(pixels), lm.model.text_embeds(ids))
    assert expected.std() > 0.1
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("size", [(32, 48), (40, 64), (56, 40)])  # native, and interpolated positions
def test_yolos_outputs_match_transformers(tiny_yolos, size):
    lm = _load(tiny_yolos)
    ref = transformers.YolosForObjectDetection.from_pretrained(tiny_yolos).eval()
    pixels = torch.randn(1, 3, *size)
    with torch.no_grad():
        expected = ref(pixels)
    logits, boxes = lm.model.raw(pixels)
    torch.testing.assert_close(logits, expected.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(boxes, expected.pred_boxes, atol=1e-5, rtol=0)


def test_yolos_boxes_match_transformers_postprocessing(tiny_yolos):
    """Without suppression (IoU threshold 1), our boxes and scores are transformers' post-processing."""
    lm = _load(tiny_yolos)
    ref = transformers.YolosForObjectDetection.from_pretrained(tiny_yolos).eval()
    processor = transformers.YolosImageProcessorPil.from_pretrained(tiny_yolos)
    image = _photo(70, 45)
    pixels = lm.preprocessing.pixels(image)[None]
    with torch.no_grad():
        outputs = ref(pixels)
    expected = processor.post_process_object_detection(outputs, threshold=0.2, target_sizes=[(45, 70)])[0]
    probs, boxes = lm.model.detect(pixels)
    ours = postprocess(probs[0], boxes[0], lm.labels, image.size, threshold=0.2, iou_threshold=1.0)
    assert len(ours) == len(expected["scores"]) > 0
    theirs = sorted(zip(expected["scores"].tolist(), expected["labels"].tolist(), expected["boxes"].tolist(),
                        strict=True), key=lambda t: -t[0])
    for d, (score, label, box) in zip(ours, theirs, strict=True):
        assert d.score == pytest.approx(score, abs=1e-5)
        assert d.label == lm.labels[label]
        clamped = [min(max(v, 0), lim) for v, lim in zip(box, (70, 45, 70, 45), strict=True)]
        assert d.box == pytest.approx(tuple(clamped), abs=1e-3)


@pytest.mark.parametrize(("fixture", "processor"), [("tiny_vit", "ViTImageProcessorPil"),
                                                    ("tiny_mobilenet", "MobileNetV2ImageProcessorPil"),
                                                    ("tiny_clip", "CLIPImageProcessorPil")])
@pytest.mark.parametrize("size", [(80, 50), (33, 61), (72, 72)])
def test_preprocessing_matches_transformers_image_processors(fixture, processor, size, request):
    folder = request.getfixturevalue(fixture)
    lm = _load(folder)
    ref = getattr(transformers, processor).from_pretrained(folder)
    image = _photo(*size)
    expected = ref(images=image, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(lm.preprocessing.pixels(image)[None], expected, atol=1e-5, rtol=0)


def test_classifier_scores_equal_transformers_end_to_end(tiny_mobilenet):
    """From an encoded JPEG to probabilities: our decoding, preprocessing and model against transformers'."""
    lm = _load(tiny_mobilenet)
    ref = transformers.MobileNetV2ForImageClassification.from_pretrained(tiny_mobilenet).eval()
    processor = transformers.MobileNetV2ImageProcessorPil.from_pretrained(tiny_mobilenet)
    buffer = io.BytesIO()
    _photo(90, 70, seed=3).save(buffer, format="JPEG")
    ours = lm.model.forward(lm.preprocessing.pixels(decode_image(buffer.getvalue()))[None]).softmax(-1)
    with torch.no_grad():
        theirs = ref(**processor(images=Image.open(io.BytesIO(buffer.getvalue())), return_tensors="pt"))
    torch.testing.assert_close(ours, theirs.logits.softmax(-1), atol=1e-5, rtol=0)


def test_legacy_and_bare_vit_names_load(tiny_vit, tmp_path):
    """Checkpoints saved from a bare ViTModel carry no ``vit.`` prefix; candle reads both."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "bare"
    folder.mkdir()
    for f in tiny_vit.iterdir():
        if f.name != "model.safetensors":
            (folder / f.name).write_bytes(f.read_bytes())
    weights = load_file(str(tiny_vit / "model.safetensors"))
    assert any(k.startswith("vit.encoder.layer.0.attention.attention.query") for k in weights)
    save_file({k.removeprefix("vit."): v for k, v in weights.items()}, str(folder / "model.safetensors"))
    pixels = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(_load(folder).model.forward(pixels), _load(tiny_vit).model.forward(pixels))


def test_half_precision_classifiers_stay_close(tiny_vit, tiny_mobilenet):
    for folder in (tiny_vit, tiny_mobilenet):
        full, half = _load(folder), _load(folder, "bfloat16")
        pixels = torch.randn(2, 3, 32, 32) if folder == tiny_vit else torch.randn(2, 3, 64, 64)
        a, b = full.model.forward(pixels).softmax(-1), half.model.forward(pixels).softmax(-1)
        assert b.dtype == torch.float32
        assert (a - b).abs().max() < 0.05
