"""Errors of the ml executor; all derive from edgecompute's hierarchy."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from edgecompute.errors import ExecutorError, InvalidRequest

__all__ = ["AudioError", "InvalidImage", "InvalidModelConfig", "InvalidRequest", "ModelError", "ShapeMismatch",
           "UnknownModel", "UnsupportedArchitecture", "UnsupportedModelOption"]


class InvalidImage(InvalidRequest):
    """An input is not an image this executor can read (wrong type, shape, dtype or corrupt bytes)."""


class AudioError(InvalidRequest):
    """Audio input that cannot be decoded or used."""


class ModelError(ExecutorError):
    """A model could not be found, validated or loaded."""


class InvalidModelConfig(ModelError):
    """A model's config (``config.json`` or GGUF metadata) has a key of the wrong type or value."""

    def __init__(self, source: str, key: str, problem: str) -> None:
        self.source, self.key = source, key
        super().__init__(f"{source}: config key {key!r} {problem}")


class ShapeMismatch(ModelError):
    """A tensor in a weights file has a different shape than the model's config asks for."""

    def __init__(self, file: str, tensor: str, expected: Sequence[int], found: Sequence[int]) -> None:
        self.file, self.tensor = file, tensor
        self.expected, self.found = tuple(expected), tuple(found)
        super().__init__(f"{file}: tensor {tensor!r} has shape {list(found)}, expected {list(expected)} "
                         "from the model's config")


class UnsupportedArchitecture(ModelError):
    def __init__(self, source: str, architecture: str, supported: Iterable[str]) -> None:
        self.architecture = architecture
        self.supported = sorted(supported)
        super().__init__(f"{source}: architecture {architecture!r} is not supported; "
                         f"supported: {', '.join(self.supported)}")


class UnknownModel(ModelError, LookupError):
    def __init__(self, name: str, known: Iterable[str]) -> None:
        self.name = name
        self.known = sorted(known)
        super().__init__(f"no model named {name!r}; known models: {', '.join(self.known) or 'none'} "
                         "(register one with the executor config 'models' or MLExecutor.add_model)")


class UnsupportedModelOption(ModelError):
    """A model's config asks for an option of a supported family that this executor does not
    implement (a rotary scaling type, an activation, a layer type...)."""

    def __init__(self, source: str, option: str, value: object, supported: Iterable[object]) -> None:
        self.source, self.option, self.value = source, option, value
        self.supported = [str(s) for s in supported]
        super().__init__(f"{source}: {option} {value!r} is not supported; supported: {', '.join(self.supported)}")
