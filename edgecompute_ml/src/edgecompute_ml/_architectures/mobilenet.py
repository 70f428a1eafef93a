"""A compact MobileNetV2 image classifier (transformers' ``MobileNetV2ForImageClassification``
names) and the reader for torchvision's MobileNetV2 ``.pth`` checkpoints.

Batch norms are folded into the convolutions when the model is built (inference only), so a
block is three convolutions; activations run channels-last and in place (measured: 1.8x-2.7x faster
on CPU than contiguous tensors with out-of-place activations). transformers' TensorFlow-style
"same" padding (``tf_padding``, the default of its configs) is supported; torchvision
checkpoints use symmetric padding and batch-norm eps 1e-5, which their converted config says.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import torch
import torch.nn.functional as F

from ..errors import ModelError, ShapeMismatch, UnsupportedArchitecture
from .vit import labels_from_config

__all__ = ["MobileNetV2Classifier", "MobileNetV2Config", "TorchvisionCheckpoint", "torchvision_config"]

# transformers' MobileNetV2: projection channels and depthwise strides of the 16 inverted residuals
_CHANNELS = (16, 24, 24, 32, 32, 32, 64, 64, 64, 64, 96, 96, 96, 160, 160, 160, 320)
_STRIDES = (2, 1, 2, 1, 1, 2, 1, 1, 1, 1, 1, 1, 2, 1, 1, 1)
# in place: a fresh activation-sized buffer per layer costs more than the activation itself
_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu6": lambda x: x.clamp_(0.0, 6.0),
    "relu": lambda x: x.relu_(),
}
_BN = ("weight", "bias", "running_mean", "running_var")


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    min_value = divisor if min_value is None else min_value
    new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:  # rounding down may not lose more than 10%
        new_value += divisor
    return int(new_value)


@attrs.frozen
class Conv:
    """One conv (+ folded batch norm, + activation) of the network, by its checkpoint name."""

    name: str
    cin: int
    cout: int
    kernel: int
    stride: int = 1
    groups: int = 1
    act: bool = True


@attrs.frozen
class MobileNetV2Config:
    labels: tuple[str, ...]
    num_channels: int = 3
    image_size: int = 224
    depth_multiplier: float = 1.0
    depth_divisible_by: int = 8
    min_depth: int = 8
    expand_ratio: float = 6.0
    first_layer_is_expansion: bool = True
    finegrained_output: bool = True
    hidden_act: str = "relu6"
    tf_padding: bool = True
    layer_norm_eps: float = 0.001

    @classmethod
    def from_hf(cls, config: Mapping[str, Any], source: str = "config.json") -> MobileNetV2Config:
        try:
            act = config.get("hidden_act", "relu6")
            if act not in _ACTIVATIONS:
                raise ModelError(f"{source}: hidden_act {act!r} not supported ({', '.join(_ACTIVATIONS)})")
            if int(config.get("output_stride", 32)) != 32:
                raise ModelError(f"{source}: output_stride {config['output_stride']} (dilated, for segmentation) "
                                 "is not supported; image classifiers use 32")
            return cls(
                labels=labels_from_config(config),
                num_channels=int(config.get("num_channels", 3)),
                image_size=int(config.get("image_size", 224)),
                depth_multiplier=float(config.get("depth_multiplier", 1.0)),
                depth_divisible_by=int(config.get("depth_divisible_by", 8)),
                min_depth=int(config.get("min_depth", 8)),
                expand_ratio=float(config.get("expand_ratio", 6.0)),
                first_layer_is_expansion=bool(config.get("first_layer_is_expansion", True)),
                finegrained_output=bool(config.get("finegrained_output", True)),
                hidden_act=act,
                tf_padding=bool(config.get("tf_padding", True)),
                layer_norm_eps=float(config.get("layer_norm_eps", 0.001)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{source}: invalid MobileNetV2 config: {type(exc).__name__}: {exc}") from exc

    def _depth(self, channels: int) -> int:
        return make_divisible(round(channels * self.depth_multiplier), self.depth_divisible_by, self.min_depth)

    @property
    def features(self) -> int:
        if self.finegrained_output and self.depth_multiplier < 1.0:
            return 1280
        return self._depth(1280)

    def blocks(self) -> list[tuple[list[Conv], bool]]:
        """The network as (convs, residual) blocks, in order."""
        ch = [self._depth(c) for c in _CHANNELS]
        stem = self._depth(32)
        p = "mobilenet_v2."
        first = [Conv(p + "conv_stem.first_conv", self.num_channels, stem, 3, 2)]
        if not self.first_layer_is_expansion:
            first.append(Conv(p + "conv_stem.expand_1x1", stem, stem, 1))
        first += [Conv(p + "conv_stem.conv_3x3", stem, stem, 3, 1, stem),
                  Conv(p + "conv_stem.reduce_1x1", stem, ch[0], 1, act=False)]
        out: list[tuple[list[Conv], bool]] = [(first, False)]
        for i, stride in enumerate(_STRIDES):
            cin, cout = ch[i], ch[i + 1]
            mid = make_divisible(round(cin * self.expand_ratio), self.depth_divisible_by, self.min_depth)
            q = f"{p}layer.{i}."
            out.append(([Conv(q + "expand_1x1", cin, mid, 1), Conv(q + "conv_3x3", mid, mid, 3, stride, mid),
                         Conv(q + "reduce_1x1", mid, cout, 1, act=False)], stride == 1 and cin == cout))
        out.append(([Conv(p + "conv_1x1", ch[-1], self.features, 1)], False))
        return out

    def expected_tensors(self) -> dict[str, tuple[int, ...]]:
        out: dict[str, tuple[int, ...]] = {}
        for convs, _ in self.blocks():
            for c in convs:
                out[c.name + ".convolution.weight"] = (c.cout, c.cin // c.groups, c.kernel, c.kernel)
                for part in _BN:
                    out[f"{c.name}.normalization.{part}"] = (c.cout,)
        return out | {"classifier.weight": (len(self.labels), self.features), "classifier.bias": (len(self.labels),)}


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding along one axis: (before, after)."""
    total = max(kernel - (stride if size % stride == 0 else size % stride), 0)
    return total // 2, total - total // 2


class MobileNetV2Classifier:
    """Pixels (N, C, H, W) -> logits (N, labels)."""

    family = "mobilenet_v2"

    def __init__(self, config: MobileNetV2Config, weights: Mapping[str, torch.Tensor], dtype: torch.dtype,
                 device: torch.device) -> None:
        self.config = config
        self.dtype = dtype
        self.device = device
        self.blocks: list[tuple[list[tuple[Conv, torch.Tensor, torch.Tensor]], bool]] = []
        for convs, residual in config.blocks():
            folded = []
            for c in convs:
                # fold the batch norm into the conv in float64, then store in the model's dtype
                w = weights[c.name + ".convolution.weight"].double()
                gamma, beta, mean, var = (weights[f"{c.name}.normalization.{p}"].double() for p in _BN)
                scale = gamma / torch.sqrt(var + config.layer_norm_eps)
                # channels-last weights: oneDNN's layout for CPU convolutions, depthwise ones above all
                folded.append((c, (w * scale[:, None, None, None]).to(dtype).contiguous(
                    memory_format=torch.channels_last), (beta - mean * scale).to(dtype)))
            self.blocks.append((folded, residual))
        self.head = (weights["classifier.weight"], weights["classifier.bias"])
        self._act = _ACTIVATIONS[config.hidden_act]

    def weight_bytes(self) -> int:
        tensors = [t for convs, _ in self.blocks for _, w, b in convs for t in (w, b)] + list(self.head)
        return sum(t.numel() * t.element_size() for t in tensors)

    def _conv(self, x: torch.Tensor, c: Conv, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.config.tf_padding:
            if c.kernel > 1:
                top, bottom = _same_padding(x.shape[-2], c.kernel, c.stride)
                left, right = _same_padding(x.shape[-1], c.kernel, c.stride)
                x = F.pad(x, (left, right, top, bottom))
            x = F.conv2d(x, w, b, stride=c.stride, groups=c.groups)
        else:
            x = F.conv2d(x, w, b, stride=c.stride, padding=(c.kernel - 1) // 2, groups=c.groups)
        return self._act(x) if c.act else x

    @torch.inference_mode()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.to(device=self.device, dtype=self.dtype).contiguous(memory_format=torch.channels_last)
        for convs, residual in self.blocks:
            y = x
            for c, w, b in convs:
                y = self._conv(y, c, w, b)
            x = y.add_(x) if residual else y
        return F.linear(x.mean(dim=(2, 3)), *self.head).float()


# -- torchvision checkpoints ----------------------------------------------------------------------

def torchvision_config(labels: tuple[str, ...]) -> dict[str, Any]:
    """The transformers-style config of torchvision's ``mobilenet_v2`` (ImageNet, 1000 classes)."""
    return {"model_type": "mobilenet_v2", "architectures": ["MobileNetV2ForImageClassification"],
            "tf_padding": False, "layer_norm_eps": 1e-5, "image_size": 224,
            "id2label": {str(i): label for i, label in enumerate(labels)}}


def _torchvision_names() -> dict[str, str]:
    """torchvision state-dict name -> transformers name."""
    pairs = {"features.0.0": "conv_stem.first_conv.convolution", "features.0.1": "conv_stem.first_conv.normalization",
             "features.1.conv.0.0": "conv_stem.conv_3x3.convolution",
             "features.1.conv.0.1": "conv_stem.conv_3x3.normalization",
             "features.1.conv.1": "conv_stem.reduce_1x1.convolution",
             "features.1.conv.2": "conv_stem.reduce_1x1.normalization",
             "features.18.0": "conv_1x1.convolution", "features.18.1": "conv_1x1.normalization"}
    for k in range(2, 18):
        q = f"layer.{k - 2}."
        pairs |= {f"features.{k}.conv.0.0": q + "expand_1x1.convolution",
                  f"features.{k}.conv.0.1": q + "expand_1x1.normalization",
                  f"features.{k}.conv.1.0": q + "conv_3x3.convolution",
                  f"features.{k}.conv.1.1": q + "conv_3x3.normalization",
                  f"features.{k}.conv.2": q + "reduce_1x1.convolution",
                  f"features.{k}.conv.3": q + "reduce_1x1.normalization"}
    out = {"classifier.1.weight": "classifier.weight", "classifier.1.bias": "classifier.bias"}
    for tv, hf in pairs.items():
        parts = ("weight",) if hf.endswith("convolution") else _BN
        out |= {f"{tv}.{p}": f"mobilenet_v2.{hf}.{p}" for p in parts}
    return out


@attrs.frozen
class _Info:
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class TorchvisionCheckpoint:
    """A torchvision ``mobilenet_v2`` state dict (``.pth``), read with ``weights_only=True`` (no
    pickled code runs) and seen under transformers' names: a drop-in for the safetensors
    :class:`~edgecompute_ml._formats.safetensors.Checkpoint`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle errors, zip errors, refused globals
            raise ModelError(f"{self.path}: cannot read as a torch state dict: {exc}") from exc
        if isinstance(state, Mapping) and "state_dict" in state:
            state = state["state_dict"]
        if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ModelError(f"{self.path}: not a torch state dict (a mapping of names to tensors)")
        names = _torchvision_names()
        if "features.0.0.weight" not in state or "classifier.1.weight" not in state:
            shown = next(iter(state), "empty")
            raise UnsupportedArchitecture(self.path, f"torch checkpoint starting with {shown!r}",
                                          ["torchvision mobilenet_v2 (.pth)"])
        self._state = {names[k]: v for k, v in state.items() if k in names}
        self.tensors = {k: _Info(str(v.dtype).removeprefix("torch."), tuple(v.shape)) for k, v in self._state.items()}
        self.files = [self.path]

    @property
    def num_classes(self) -> int:
        return int(self.tensors["classifier.weight"].shape[0])

    def describe(self) -> str:
        return self.path

    def validate(self, expected: Mapping[str, tuple[int, ...]], optional: frozenset[str] = frozenset()) -> None:
        for name, shape in expected.items():
            info = self.tensors.get(name)
            if info is None:
                raise ModelError(f"{self.path}: tensor for {name!r} (shape {list(shape)}) is missing")
            if info.shape != tuple(shape):
                raise ShapeMismatch(self.path, name, shape, info.shape)
            if info.dtype not in ("float32", "float16", "bfloat16", "float64"):
                raise ModelError(f"{self.path}: tensor {name!r} has dtype {info.dtype}; expected a float dtype")

    def load(self, names: Any, dtype: Any, device: Any) -> dict[str, Any]:
        return {n: self._state[n].to(device=device, dtype=dtype).contiguous() for n in names if n in self._state}
