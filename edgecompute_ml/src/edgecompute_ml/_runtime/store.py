"""The model store: models by name, inspected from headers, loaded into torch on demand.

A model is an HF-layout folder (``config.json``, ``model.safetensors`` or shards with
``model.safetensors.index.json``, ``tokenizer.json``) or a Llama-family GGUF file. Families are
pluggable: :func:`register_family` adds one (a config parser, the tensors it needs, a builder).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs

from .._tasks.vision import OBJECT_DETECTION, inspect_torchvision, load_vision_model, vision_families
from ..errors import InvalidModelConfig, ModelError, ShapeMismatch, UnsupportedArchitecture, UnsupportedModelOption
from .config_check import check_model_config
from .plan import Family, LoadedModel, LoadedVisionModel, ModelPlan, ModelSource

__all__ = ["FAMILIES", "inspect_model", "load_model", "register_detection_family", "register_family",
           "supported_architectures"]


# the decoder families share one implementation (_architectures/llama.py), kept in step with its
# DECODER_FAMILIES, which is not imported here so that importing the store does not import torch
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
_ROW_WEIGHTS = ("lm_head.weight", "embed_tokens.weight")

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
        return inspect_torchvision(source, FAMILIES["mobilenet_v2"])
    if source.kind == "gguf":
        from .._formats.gguf import GGUFFile, gguf_config, gguf_to_hf_names

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
        for name, shape in expected.items():
            t = by_hf.get(name)
            if t is None:
                raise ModelError(f"{path}: tensor for {name!r} (shape {list(shape)}) is missing")
            if t.shape != tuple(shape):
                raise ShapeMismatch(str(path), t.name, shape, t.shape)
        numel = sum(int(_prod(s)) for s in expected.values())
        return ModelPlan(source, family, config, raw, expected, numel, gguf=g)
    from .._formats.ctranslate2 import converted_folder, is_ctranslate2_folder

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
    from .._formats.safetensors import Checkpoint

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
            from .._formats.gguf import gguf_tokenizer_config

            tok_config = {**gguf_tokenizer_config(gguf), **tok_config}
        return tokenizer, tok_config
    if gguf is not None:
        from .._formats.gguf import gguf_tokenizer, gguf_tokenizer_config

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
    """How the weights are held: "int8", "int4", "gguf" or None (float), after checking that the family
    and the device can (a GGUF file's default falls back to float where they cannot)."""
    source = plan.source
    mode = source.quantization
    explicit = source.dtype is not None
    if mode is None:
        return None
    if not plan.family.quantizable or (mode == "int4" and plan.family.task != "text-generation"):
        if explicit:
            raise UnsupportedModelOption(f"model {source.name!r} ({plan.family.name})", "dtype", source.dtype,
                                         ["float32", "float16", "bfloat16", "auto"]
                                         + (["int8"] if plan.family.quantizable else []))
        return None
    if device != "cpu":  # the packed kernels are torch's CPU ones
        if explicit:
            raise UnsupportedModelOption(f"model {source.name!r} on {device}", "dtype", source.dtype,
                                         ["float32", "float16", "bfloat16", "auto"])
        return None
    return mode


def _quantizer(mode: str, quantizable: tuple[str, ...]) -> Callable[[str, Any], Any]:
    """``convert(name, tensor)`` for ``dtype = "int8"``/``"int4"``: a quantizable 2-D weight ->
    its unpacked codes (the model packs them), anything else as it is. With int4, the rows looked
    up or scored by the model (token embeddings, the output projection: int8 in the model, see
    _formats/quant.py) and weights whose inputs are not whole groups of 32 are int8."""
    from .._formats.quant import GROUP, quantize_int8, quantize_q4

    def convert(name: str, tensor: Any) -> Any:
        if not name.endswith(quantizable) or tensor.dim() != 2:
            return tensor
        if mode == "int4" and tensor.shape[1] % GROUP == 0 and not name.endswith(_ROW_WEIGHTS):
            return quantize_q4(tensor)
        return quantize_int8(tensor)

    return convert


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
            from .._formats.gguf import gguf_quantized_weights

            weights = gguf_quantized_weights(plan.gguf, plan.raw_config, plan.expected.keys())
            for k, v in weights.items():
                if not isinstance(v, torch.Tensor) and not k.endswith(quantizable):
                    v = v.dequantize()  # a quantized tensor the family multiplies in float
                if isinstance(v, torch.Tensor):
                    weights[k] = v.to(device=tdevice, dtype=dtype)
        else:
            from .._formats.gguf import gguf_weights

            arrays = gguf_weights(plan.gguf, plan.raw_config)
            weights = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device=tdevice, dtype=dtype)
                       for k, v in arrays.items() if k in plan.expected}
            del arrays
        folder = Path(source.path).parent
    else:
        convert = _quantizer(quantization, quantizable) if quantization in ("int8", "int4") else None
        # quantized as each tensor is read: the float copy of one weight lives at a time
        weights = (plan.checkpoint.load(plan.expected.keys(), dtype, tdevice) if convert is None
                   else plan.checkpoint.load(plan.expected.keys(), dtype, tdevice, convert=convert))
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


def register_detection_family(name: str, *, model_types: tuple[str, ...], architectures: tuple[str, ...],
                              parse: Callable[[Mapping[str, Any], str, Any], Any], build: Callable[..., Any]) -> None:
    """Add a detection family: ``parse(config_dict, source, tensor_names)`` returns a config with
    ``expected_tensors()``; ``build(config, weights, dtype, device)`` returns a
    :class:`~edgecompute_ml._tasks.detection.Detector`."""
    register_family(Family(name, OBJECT_DETECTION, model_types, architectures, parse, build, load_vision_model))


for _family in vision_families():
    FAMILIES.setdefault(_family.name, _family)
