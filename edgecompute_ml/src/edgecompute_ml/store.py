"""The model store: models by name, inspected from headers, loaded into torch on demand.

A model is an HF-layout folder (``config.json``, ``model.safetensors`` or shards with
``model.safetensors.index.json``, ``tokenizer.json``) or a Llama-family GGUF file. Families are
pluggable: :func:`register_family` adds one (a config parser, the tensors it needs, a builder).
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from .config_check import check_model_config
from .errors import InvalidModelConfig, ModelError, UnsupportedArchitecture, UnsupportedModelOption

if TYPE_CHECKING:
    from .vision import LoadedVisionModel

__all__ = ["FAMILIES", "Family", "LoadedModel", "ModelPlan", "ModelSource", "inspect_model", "load_model",
           "register_family"]


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
    # tensor-name endings of the 2-D weights the family can hold quantized (quant.py); empty: none
    quantizable: tuple[str, ...] = ()

    @classmethod
    def lazy(cls, name: str, task: str, model_types: tuple[str, ...], architectures: tuple[str, ...], *,
             module: str, config: str, model: str, prefixed: bool = False,
             load: Callable[[ModelPlan, str, str], LoadedModel | LoadedVisionModel] | None = None,
             quantizable: tuple[str, ...] = ()) -> Family:
        """A family of this package whose module is imported on first use, so that importing
        ``edgecompute_ml`` stays light. ``config`` and ``model`` name the module's classes
        (``config.from_hf(dict, source)``, ``model(config, weights, dtype, device)``); with
        ``prefixed``, the config learns the checkpoint's tensor-name prefix (``with_prefix``)."""

        def parse(raw: Mapping[str, Any], source: str, names: Any) -> Any:
            parsed = getattr(importlib.import_module(f".{module}", __package__), config).from_hf(raw, source)
            return parsed.with_prefix(names) if prefixed else parsed

        def build(parsed: Any, weights: Any, dtype: Any, device: Any) -> Any:
            return getattr(importlib.import_module(f".{module}", __package__), model)(parsed, weights, dtype, device)

        return cls(name, task, model_types, architectures, parse, build, load, quantizable)


# the decoder families share one implementation (llama.py); kept in step with llama.DECODER_FAMILIES,
# which is not imported here so that importing the store does not import torch
_DECODERS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "llama": (("llama", "mistral"), ("LlamaForCausalLM", "MistralForCausalLM")),
    "qwen2": (("qwen2",), ("Qwen2ForCausalLM",)),
    "qwen3": (("qwen3",), ("Qwen3ForCausalLM",)),
    "gemma2": (("gemma2",), ("Gemma2ForCausalLM",)),
    "gemma3": (("gemma3_text",), ("Gemma3ForCausalLM",)),
    "phi3": (("phi3",), ("Phi3ForCausalLM",)),
}

_DECODER_LINEARS = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "qkv_proj.weight",
                    "gate_proj.weight", "up_proj.weight", "down_proj.weight", "gate_up_proj.weight",
                    "lm_head.weight", "embed_tokens.weight")

FAMILIES: dict[str, Family] = {
    **{name: Family.lazy(name, "text-generation", types, archs, module="llama", config="LlamaConfig",
                         model="LlamaModel", quantizable=_DECODER_LINEARS)
       for name, (types, archs) in _DECODERS.items()},
    "bert": Family.lazy("bert", "embeddings", ("bert",), ("BertModel", "BertForMaskedLM", "BertForPreTraining"),
                        module="bert", config="BertConfig", model="BertModel", prefixed=True),
    "whisper": Family.lazy("whisper", "speech-recognition", ("whisper",), ("WhisperForConditionalGeneration",),
                           module="whisper", config="WhisperConfig", model="WhisperModel",
                           quantizable=("q_proj.weight", "k_proj.weight", "v_proj.weight", "out_proj.weight",
                                        "fc1.weight", "fc2.weight", "embed_tokens.weight")),
}


def register_family(family: Family) -> None:
    """Add (or replace) a model family."""
    FAMILIES[family.name] = family


def supported_architectures() -> list[str]:
    return sorted({a for f in FAMILIES.values() for a in f.architectures})


def family_for(config: Mapping[str, Any], source: str) -> Family:
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    for family in FAMILIES.values():
        if any(a in family.architectures for a in architectures):
            return family
    shown = architectures[0] if architectures else (model_type or "unknown (config.json has no architectures)")
    raise UnsupportedArchitecture(source, str(shown), supported_architectures())


# weight formats a model's ``dtype`` may name besides the float types: "int8" (weight-only int8,
# per-row scales, quantized at load) and "quantized" (a GGUF file's own quantization, its default)
_WEIGHT_FORMATS = ("int8", "quantized")


@attrs.frozen
class ModelSource:
    """Where a named model lives, and per-model overrides.

    ``dtype``: a float type (the weights and activations), ``"int8"`` (linear weights quantized
    to int8 at load) or, for a GGUF file, ``"quantized"`` (its quantized tensors stay packed: the
    default for GGUF files on CPU; a float ``dtype`` dequantises them)."""

    name: str
    path: str
    dtype: str | None = None

    def __attrs_post_init__(self) -> None:
        value = self.dtype
        if value is None:
            return
        from .device import _DTYPES

        formats = _WEIGHT_FORMATS if self.kind == "gguf" else ("int8",)
        supported = [*sorted(set(_DTYPES.values()) - {"auto"}), "auto", *formats]
        if not isinstance(value, str) or (value.lower() not in _DTYPES and value.lower() not in formats):
            raise UnsupportedModelOption(f"model {self.name!r}", "dtype", value, supported)

    @property
    def quantization(self) -> str | None:
        """"int8", "gguf" (the file's own formats) or None (float weights)."""
        dtype = self.dtype.lower() if self.dtype else None
        if dtype == "int8":
            return "int8"
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
            return "torch"  # a torchvision state dict (vision.inspect_torchvision)
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


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ModelError(f"{path}: cannot read: {exc}") from exc
    except ValueError as exc:
        raise ModelError(f"{path}: invalid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a JSON object")
    return data


def inspect_model(source: ModelSource) -> ModelPlan:
    """Read config and headers, pick the family and validate every tensor's name and shape."""
    path = Path(source.path)
    if source.kind == "torch":
        from .vision import inspect_torchvision

        return inspect_torchvision(source)
    if source.kind == "gguf":
        from .gguf_io import GGUFFile, gguf_config, gguf_to_hf_names

        if not path.is_file():
            raise ModelError(f"model {source.name!r}: GGUF file {path} does not exist")
        g = GGUFFile(path)
        raw = gguf_config(g)
        family = family_for(raw, str(path))
        check_model_config(raw, str(path))
        config = family.parse(raw, str(path), ())
        expected = config.expected_tensors()
        names = gguf_to_hf_names(g)
        by_hf = {h: g.tensors[n] for n, h in names.items()}
        from .errors import ShapeMismatch

        for name, shape in expected.items():
            t = by_hf.get(name)
            if t is None:
                raise ModelError(f"{path}: tensor for {name!r} (shape {list(shape)}) is missing")
            if t.shape != tuple(shape):
                raise ShapeMismatch(str(path), t.name, shape, t.shape)
        numel = sum(int(_prod(s)) for s in expected.values())
        return ModelPlan(source, family, config, raw, expected, numel, gguf=g)
    from .ctranslate2_io import converted_folder, is_ctranslate2_folder

    if path.is_dir() and is_ctranslate2_folder(path):  # converted once into the cache, then read as HF layout
        path = converted_folder(path)
        source = attrs.evolve(source, path=str(path))
    if not path.is_dir():
        raise ModelError(f"model {source.name!r}: {path} is neither a model folder nor a .gguf file")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelError(f"model {source.name!r}: {path} has no config.json")
    raw = _read_json(config_path)
    check_model_config(raw, str(config_path))  # configs are data: typed errors naming the key, before parsing
    family = family_for(raw, str(config_path))
    from .safetensors_io import Checkpoint

    checkpoint = Checkpoint(path)
    config = family.parse(raw, str(config_path), checkpoint.tensors.keys())
    expected = config.expected_tensors()
    checkpoint.validate(expected)
    numel = sum(int(_prod(s)) for s in expected.values())
    return ModelPlan(source, family, config, raw, expected, numel, checkpoint=checkpoint)


def _prod(shape: tuple[int, ...]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


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


def _load_tokenizer(folder: Path, gguf: Any) -> tuple[Any, dict[str, Any]]:
    from tokenizers import Tokenizer

    tok_config: dict[str, Any] = {}
    if (folder / "tokenizer_config.json").is_file():
        tok_config = _read_json(folder / "tokenizer_config.json")
    if (folder / "chat_template.jinja").is_file():
        tok_config["chat_template"] = (folder / "chat_template.jinja").read_text()
    tokenizer_file = folder / "tokenizer.json"
    if tokenizer_file.is_file():
        try:
            tokenizer = Tokenizer.from_file(str(tokenizer_file))
        except Exception as exc:
            raise ModelError(f"{tokenizer_file}: cannot load tokenizer: {exc}") from exc
        if gguf is not None:
            from .gguf_io import gguf_tokenizer_config

            tok_config = {**gguf_tokenizer_config(gguf), **tok_config}
        return tokenizer, tok_config
    if gguf is not None:
        from .gguf_io import gguf_tokenizer, gguf_tokenizer_config

        return gguf_tokenizer(gguf), {**gguf_tokenizer_config(gguf), **tok_config}
    raise ModelError(f"{folder}: no tokenizer.json")


def _release_load_memory(gguf: Any) -> None:
    """Give back what loading used and no longer needs: the GGUF file's pages read (resident in
    this process while mapped; the plan keeps the mapping for its metadata) and the heap memory
    freed by the temporaries (codes before packing, requantised rows). glibc keeps freed heap
    memory otherwise: SmolLM2 Q4_1 kept 380 MB resident for 91 MB of weights (measured, docs/ml.md)."""
    if gguf is not None:
        gguf.drop_pages()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def _quantization(plan: ModelPlan, device: str) -> str | None:
    """How the weights are held: "int8", "gguf" or None (float), after checking that the family
    and the device can (a GGUF file's default falls back to float where they cannot)."""
    source = plan.source
    mode = source.quantization
    explicit = source.dtype is not None
    if mode is None:
        return None
    if not plan.family.quantizable:
        if explicit:
            raise UnsupportedModelOption(f"model {source.name!r} ({plan.family.name})", "dtype", source.dtype,
                                         ["float32", "float16", "bfloat16", "auto"])
        return None
    if device != "cpu":  # the packed kernels are torch's CPU ones
        if explicit:
            raise UnsupportedModelOption(f"model {source.name!r} on {device}", "dtype", source.dtype,
                                         ["float32", "float16", "bfloat16", "auto"])
        return None
    return mode


def load_model(plan: ModelPlan, dtype_name: str, device: str) -> LoadedModel | LoadedVisionModel:
    """Load the weights (converted to ``dtype_name`` on ``device``) and the tokenizer."""
    if plan.family.load is not None:
        return plan.family.load(plan, dtype_name, device)
    import numpy as np
    import torch

    dtype = getattr(torch, dtype_name)
    tdevice = torch.device(device)
    source = plan.source
    quantization = _quantization(plan, device)
    quantizable = plan.family.quantizable
    weights: dict[str, Any]
    if plan.gguf is not None:
        if quantization:
            from .gguf_io import gguf_quantized_weights

            weights = gguf_quantized_weights(plan.gguf, plan.raw_config, plan.expected.keys())
            for k, v in weights.items():
                if not isinstance(v, torch.Tensor) and not k.endswith(quantizable):
                    v = v.dequantize()  # a quantized tensor the family multiplies in float
                if isinstance(v, torch.Tensor):
                    weights[k] = v.to(device=tdevice, dtype=dtype)
        else:
            from .gguf_io import gguf_weights

            arrays = gguf_weights(plan.gguf, plan.raw_config)
            weights = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device=tdevice, dtype=dtype)
                       for k, v in arrays.items() if k in plan.expected}
            del arrays
        folder = Path(source.path).parent
    else:
        weights = plan.checkpoint.load(plan.expected.keys(), dtype, tdevice)
        if quantization == "int8":
            from .quant import quantize_int8

            for k in list(weights):  # one at a time: the float copy of each goes as it is replaced
                if k.endswith(quantizable) and weights[k].dim() == 2:
                    weights[k] = quantize_int8(weights[k])
        folder = Path(source.path)
    model = plan.family.build(plan.config, weights, dtype, tdevice)
    del weights
    tokenizer, tok_config = _load_tokenizer(folder, plan.gguf)
    _release_load_memory(plan.gguf)
    eos: set[int] = set(getattr(plan.config, "eos_token_ids", ()) or ())
    gen_config = folder / "generation_config.json"
    if plan.gguf is None and gen_config.is_file():
        value = _read_json(gen_config).get("eos_token_id")
        eos.update(value if isinstance(value, list) else [] if value is None else [value])
    eos_token = tok_config.get("eos_token")
    if isinstance(eos_token, dict):
        eos_token = eos_token.get("content")
    if isinstance(eos_token, str) and tokenizer.token_to_id(eos_token) is not None:
        eos.add(tokenizer.token_to_id(eos_token))
    tokenizer.no_padding()  # we pad batches ourselves, to their longest member
    pooling, normalize = "mean", False
    max_length = int(tok_config.get("model_max_length") or 0) or 10**9
    max_length = min(max_length, int(plan.raw_config.get("max_position_embeddings", 512)))
    if plan.family.task == "embeddings":
        pooling, normalize = _sentence_transformers_settings(folder)
        # sentence-transformers truncates to its own max_seq_length (256 for all-MiniLM-L6-v2),
        # not to the 512 positions of the encoder: longer inputs must be cut there to match it
        seq = _sentence_transformers_max_seq_length(folder)
        if seq is not None:
            max_length = min(max_length, seq)
    if plan.family.task == "embeddings":
        tokenizer.enable_truncation(max_length)
    return LoadedModel(
        name=source.name, family=plan.family.name, task=plan.family.task, model=model, tokenizer=tokenizer,
        tokenizer_config=tok_config, eos_token_ids=frozenset(int(e) for e in eos), bytes=model.weight_bytes(),
        device=device, dtype=dtype_name, pooling=pooling, normalize=normalize, quantization=quantization,
        chat_template=tok_config.get("chat_template") if isinstance(tok_config.get("chat_template"), str) else None,
        add_bos_token=bool(tok_config.get("add_bos_token", False)),
        bos_token_id=getattr(plan.config, "bos_token_id", None), max_length=max_length,
    )


def _sentence_transformers_max_seq_length(folder: Path) -> int | None:
    """``max_seq_length`` of a sentence-transformers folder's ``sentence_bert_config.json``."""
    path = folder / "sentence_bert_config.json"
    if not path.is_file():
        return None
    value = _read_json(path).get("max_seq_length")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
        raise InvalidModelConfig(str(path), "max_seq_length", f"must be an integer >= 2, not {value!r}")
    return value


def _sentence_transformers_settings(folder: Path) -> tuple[str, bool]:
    """Pooling and normalisation as a sentence-transformers folder declares (mean, no norm else)."""
    pooling, normalize = "mean", False
    modules = folder / "modules.json"
    if modules.is_file():
        try:
            entries = json.loads(modules.read_text())
            normalize = any(str(e.get("type", "")).endswith("Normalize") for e in entries)
            for e in entries:
                if str(e.get("type", "")).endswith("Pooling"):
                    cfg = _read_json(folder / e.get("path", "") / "config.json")
                    if cfg.get("pooling_mode_cls_token"):
                        pooling = "cls"
                    elif cfg.get("pooling_mode_max_tokens"):
                        pooling = "max"
        except (OSError, ValueError, AttributeError, ModelError):
            pass
    return pooling, normalize


def _register_vision_families() -> None:
    from .vision import vision_families

    for family in vision_families():
        FAMILIES.setdefault(family.name, family)


_register_vision_families()
