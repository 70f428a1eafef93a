"""What the store knows about a model: where it lives (:class:`ModelSource`), its family
(:class:`Family`), what loading it will take (:class:`ModelPlan`) and the model once loaded
(:class:`LoadedModel`, :class:`LoadedVisionModel`).

These records import neither torch nor any family's module, so the store and the vision tasks
both build on them without importing each other.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from ..errors import ModelError, UnsupportedModelOption
from .device import DTYPES

__all__ = ["Family", "LoadedModel", "LoadedVisionModel", "ModelPlan", "ModelSource"]


@attrs.frozen
class Family:
    """A model family: which configs it accepts and how to build it.

    ``parse(config_dict, source, tensor_names)`` returns the family's config object, which has
    ``expected_tensors() -> {name: shape}``; ``build(config, weights, dtype, device)`` returns
    the model. ``task`` is "text-generation", "embeddings", "speech-recognition" or a vision task.
    ``load(plan, dtype_name, device)``, when given, replaces :func:`load_model`'s text-model loading
    (vision families).
    """

    name: str
    task: str
    model_types: tuple[str, ...]
    architectures: tuple[str, ...]
    parse: Callable[[Mapping[str, Any], str, Any], Any]
    build: Callable[..., Any]
    load: Callable[[ModelPlan, str, str], LoadedModel | LoadedVisionModel] | None = None
    # tensor-name endings of the 2-D weights the family can hold quantized (_formats/quant.py); empty: none
    quantizable: tuple[str, ...] = ()

    @classmethod
    def lazy(cls, name: str, task: str, model_types: tuple[str, ...], architectures: tuple[str, ...], *,
             module: str, config: str, model: str, prefixed: bool = False,
             load: Callable[[ModelPlan, str, str], LoadedModel | LoadedVisionModel] | None = None,
             quantizable: tuple[str, ...] = ()) -> Family:
        """A family of this package whose module (in ``edgecompute_ml._architectures``) is imported
        on first use, so that importing ``edgecompute_ml`` stays light. ``config`` and ``model`` name
        the module's classes
        (``config.from_hf(dict, source)``, ``model(config, weights, dtype, device)``); with
        ``prefixed``, the config learns the checkpoint's tensor-name prefix (``with_prefix``)."""

        def member(attribute: str) -> Any:
            return getattr(importlib.import_module(f".._architectures.{module}", __package__), attribute)

        def parse(raw: Mapping[str, Any], source: str, names: Any) -> Any:
            parsed = member(config).from_hf(raw, source)
            return parsed.with_prefix(names) if prefixed else parsed

        def build(parsed: Any, weights: Any, dtype: Any, device: Any) -> Any:
            return member(model)(parsed, weights, dtype, device)

        return cls(name, task, model_types, architectures, parse, build, load, quantizable)


# weight formats a model's ``dtype`` may name besides the float types: "int8" (weight-only int8,
# per-row scales, quantized at load), "int4" (4 bits in groups of 32, quantized at load; safetensors
# folders) and "quantized" (a GGUF file's own quantization, its default)
_WEIGHT_FORMATS = ("int8", "int4", "quantized")
_FOLDER_FORMATS = ("int8", "int4")


@attrs.frozen
class ModelSource:
    """Where a named model lives, and per-model overrides.

    ``dtype``: a float type (the weights and activations), ``"int8"`` (linear weights quantized
    to int8 at load), ``"int4"`` (a safetensors decoder's linear weights quantized to 4 bits at
    load) or, for a GGUF file, ``"quantized"`` (its quantized tensors stay packed: the
    default for GGUF files on CPU; a float ``dtype`` dequantises them)."""

    name: str
    path: str
    dtype: str | None = None

    def __attrs_post_init__(self) -> None:
        value = self.dtype
        if value is None:
            return
        formats = ("int8", "quantized") if self.kind == "gguf" else _FOLDER_FORMATS
        supported = [*sorted(set(DTYPES.values()) - {"auto"}), "auto", *formats]
        if not isinstance(value, str) or (value.lower() not in DTYPES and value.lower() not in formats):
            raise UnsupportedModelOption(f"model {self.name!r}", "dtype", value, supported)

    @property
    def quantization(self) -> str | None:
        """"int8", "int4", "gguf" (the file's own formats) or None (float weights)."""
        dtype = self.dtype.lower() if self.dtype else None
        if dtype in _FOLDER_FORMATS:
            return dtype
        if self.kind == "gguf" and dtype in (None, "quantized"):
            return "gguf"
        return None

    @property
    def float_dtype(self) -> str | None:
        """The float dtype asked for (None: the executor's)."""
        return None if self.dtype is None or self.dtype.lower() in _WEIGHT_FORMATS else self.dtype

    @property
    def kind(self) -> str:
        lower = self.path.lower()
        if lower.endswith((".pth", ".pt")):
            return "torch"  # a torchvision state dict (_tasks/vision.py, inspect_torchvision)
        return "gguf" if lower.endswith(".gguf") else "folder"

    @classmethod
    def parse(cls, name: str, value: Any) -> ModelSource:
        if isinstance(value, (str, os.PathLike)):
            return cls(name, os.fspath(value))
        if isinstance(value, Mapping) and "path" in value:
            extra = set(value) - {"path", "dtype"}
            if extra:
                raise ModelError(f"model {name!r}: unknown key(s) {', '.join(sorted(map(str, extra)))}; "
                                 "valid: path, dtype")
            return cls(name, os.fspath(value["path"]), value.get("dtype"))
        raise ModelError(f"model {name!r}: expected a path or a table with 'path', not {value!r}")


@attrs.define
class ModelPlan:
    """What loading a model will take, from its config and headers alone."""

    source: ModelSource
    family: Family
    config: Any
    raw_config: dict[str, Any]
    expected: dict[str, tuple[int, ...]]
    numel: int
    checkpoint: Any = None  # safetensors Checkpoint
    gguf: Any = None  # GGUFFile

    def weight_bytes(self, element_size: int) -> int:
        return self.numel * element_size


@attrs.define(eq=False)
class LoadedModel:
    """A model ready to run: the torch model, its tokenizer and what generation/pooling need."""

    name: str
    family: str
    task: str
    model: Any
    tokenizer: Any
    tokenizer_config: dict[str, Any]
    eos_token_ids: frozenset[int]
    bytes: int
    device: str
    dtype: str
    pooling: str = "mean"
    normalize: bool = False
    chat_template: str | None = None
    add_bos_token: bool = False
    bos_token_id: int | None = None
    max_length: int = 512
    quantization: str | None = None  # "int8", "gguf" (packed as the file has them) or None (float)


@attrs.define(eq=False)
class LoadedVisionModel:
    """A vision model ready to run, with its preprocessing, class names and (CLIP) tokenizer."""

    name: str
    family: str
    task: str
    model: Any
    preprocessing: Any  # _preprocessing.image.Preprocessing
    labels: tuple[str, ...]
    bytes: int
    device: str
    dtype: str
    tokenizer: Any = None

    @property
    def max_length(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 77))
