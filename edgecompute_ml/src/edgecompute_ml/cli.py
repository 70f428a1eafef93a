"""``edgecompute-ml``: list the models an operator configured, check a model, convert one ahead of time.

    edgecompute-ml list [--config edgecompute.toml]   # the [executors.ml] models, read from headers
    edgecompute-ml check PATH [--dtype int8]           # a model folder, GGUF file or .pth, as the executor sees it
    edgecompute-ml convert SOURCE OUT_FOLDER           # a GGUF file or CTranslate2 Whisper folder -> HF folder

``list`` and ``check`` read configs and tensor headers, as the executor does before it loads a
model (no torch; a CTranslate2 folder is converted into the cache on first look, as the executor
converts it); ``convert`` writes the weights.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgecompute-ml", description=(__doc__ or "").split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="list the models the ml executor serves, with their family and task")
    listing.add_argument("--config", help="the edgecompute configuration file (default: as `edgecompute` finds it)")
    check = commands.add_parser("check", help="inspect a model folder, GGUF file or torchvision .pth")
    check.add_argument("path")
    check.add_argument("--dtype", help="a per-model dtype to check with it (float16, int8, quantized...)")
    convert = commands.add_parser("convert", help="write a GGUF file or a CTranslate2 Whisper folder as an "
                                                  "HF-layout safetensors folder")
    convert.add_argument("source", type=Path)
    convert.add_argument("out", type=Path)
    args = parser.parse_args(argv)

    from edgecompute.errors import EdgeComputeError

    try:
        if args.command == "list":
            print(json.dumps(_list(args.config), indent=2))
        elif args.command == "check":
            from ._runtime.plan import ModelSource

            print(json.dumps(_describe(ModelSource(Path(args.path).name, args.path, args.dtype)), indent=2))
        else:
            print(_convert(args.source, args.out))
    except EdgeComputeError as exc:
        print(f"edgecompute-ml: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _list(config_file: str | None) -> dict[str, Any]:
    """The models of the ``[executors.ml]`` table (and the demo packages' unless switched off), each
    described from its headers, or with the error that loading it would raise."""
    from edgecompute import Config
    from edgecompute.errors import EdgeComputeError

    from ._runtime.plan import ModelSource
    from .executor import demo_model_paths
    from .settings import MLSettings

    settings = MLSettings.from_mapping(Config.load(config_file).executors.get("ml"))
    sources = [ModelSource(name, path) for name, path in demo_model_paths().items()] if settings.demo_models else []
    sources += settings.models
    models: dict[str, Any] = {}
    for source in sources:
        try:
            models[source.name] = _describe(source)
        except EdgeComputeError as exc:
            models[source.name] = {"path": source.path, "error": f"{type(exc).__name__}: {exc}"}
    return {"models": models, "default_models": dict(settings.default_models)}


def _describe(source: Any) -> dict[str, Any]:
    from ._runtime.store import inspect_model

    plan = inspect_model(source)
    out: dict[str, Any] = {"path": source.path, "family": plan.family.name, "task": f"ml/{plan.family.task}",
                           "parameters": plan.numel}
    if source.dtype is not None:
        out["dtype"] = source.dtype
    return out


def _convert(source: Path, out: Path) -> Path:
    from .errors import ModelError

    if source.is_file() and source.suffix.lower() == ".gguf":
        from ._formats.gguf import convert_gguf_to_folder

        return convert_gguf_to_folder(source, out)
    from ._formats.ctranslate2 import convert_ctranslate2_whisper, is_ctranslate2_folder

    if source.is_dir() and is_ctranslate2_folder(source):
        return convert_ctranslate2_whisper(source, out)
    raise ModelError(f"{source}: neither a .gguf file nor a CTranslate2 folder (model.bin); nothing to convert")


if __name__ == "__main__":
    sys.exit(main())
