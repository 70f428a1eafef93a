"""Images in, pixel tensors out: decoding and the preprocessing a model's folder declares.

Accepted images: numpy arrays (HxW grey, HxWx3 RGB or HxWx4 RGBA; uint8 0..255 or float 0..1),
PIL images and encoded bytes (PNG, JPEG, anything Pillow reads). Preprocessing follows
``preprocessor_config.json`` the way transformers' image processors read it: resize (to a fixed
``height``/``width`` or so that the shortest edge has ``shortest_edge`` pixels), centre crop,
rescale (1/255) and normalise (mean/std). Resizing goes through Pillow, as the reference
processors do, so that pixels match them.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from ..errors import InvalidImage, ModelError

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "Preprocessing", "decode_image", "decode_images",
           "image_inputs", "image_size"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Larger images are refused before decoding (a decompression bomb guard): 8000 x 8000.
MAX_PIXELS = 64_000_000
# PIL resample codes by the names transformers writes (it writes the integer codes)
_RESAMPLE_NAMES = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


def _pil() -> Any:
    from PIL import Image

    return Image


def _too_large(what: str, width: int, height: int, max_pixels: int, stage: str = "") -> InvalidImage:
    return InvalidImage(f"{what}: {stage}{width}x{height} = {width * height} pixels exceed the limit of {max_pixels} "
                        "(executors.ml max_image_pixels)")


def image_size(image: Any) -> tuple[int, int] | None:
    """(width, height) of an accepted image without decoding it (the header of encoded bytes);
    None when it cannot be told cheaply (the decoder will then say what is wrong)."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        try:
            with _pil().open(io.BytesIO(bytes(image))) as opened:
                width, height = opened.size
                return int(width), int(height)
        except Exception:  # noqa: BLE001 - undecodable bytes fail later, in decode_image, with the reason
            return None
    size = getattr(image, "size", None)
    if isinstance(size, tuple) and len(size) == 2:  # a PIL image
        return int(size[0]), int(size[1])
    shape = getattr(image, "shape", None)
    if isinstance(shape, tuple) and len(shape) in (2, 3):
        return int(shape[1]), int(shape[0])
    return None


def decode_image(image: Any, what: str = "image", max_pixels: int | None = None) -> Any:
    """Any accepted image -> an RGB PIL image. Raises :class:`InvalidImage` naming the problem;
    images of more than ``max_pixels`` are refused from their header, before decoding."""
    max_pixels = MAX_PIXELS if max_pixels is None else max_pixels
    Image = _pil()
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        if not data:
            raise InvalidImage(f"{what}: empty bytes")
        try:
            opened = Image.open(io.BytesIO(data))
            width, height = opened.size
            if width * height > max_pixels:
                raise _too_large(what, width, height, max_pixels)
            opened.load()
        except InvalidImage:
            raise
        except Image.DecompressionBombError as exc:  # PIL's own guard (MAX_IMAGE_PIXELS), from the header
            raise InvalidImage(f"{what}: {exc} (executors.ml max_image_pixels is {max_pixels})") from exc
        except Exception as exc:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ValueError...
            raise InvalidImage(f"{what}: cannot decode {len(data)} bytes as an image: {exc}") from exc
        from PIL import ImageOps

        image = ImageOps.exif_transpose(opened)  # camera photos store their rotation in EXIF
    if isinstance(image, Image.Image):
        width, height = image.size
        if width < 1 or height < 1:
            raise InvalidImage(f"{what}: image has no pixels ({width}x{height})")
        if width * height > max_pixels:
            raise _too_large(what, width, height, max_pixels)
        if image.mode == "RGB":
            return image
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            image = image.convert("RGBA")
            background = Image.new("RGBA", image.size, (255, 255, 255, 255))  # as transformers' convert_rgb
            return Image.alpha_composite(background, image).convert("RGB")
        return image.convert("RGB")
    return Image.fromarray(_array_to_uint8(image, what, max_pixels), mode="RGB")


def _array_to_uint8(image: Any, what: str, max_pixels: int | None = None) -> Any:
    import numpy as np

    max_pixels = MAX_PIXELS if max_pixels is None else max_pixels

    if not isinstance(image, np.ndarray):
        kind = type(image).__name__
        raise InvalidImage(f"{what}: expected a numpy array, a PIL image or encoded image bytes, not {kind}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise InvalidImage(f"{what}: array of shape {list(image.shape)} is not an image; expected HxW, HxWx3 "
                           "or HxWx4 (channels last)")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise InvalidImage(f"{what}: image has no pixels ({image.shape[1]}x{image.shape[0]})")
    if image.shape[0] * image.shape[1] > max_pixels:
        raise _too_large(what, image.shape[1], image.shape[0], max_pixels)
    if image.dtype == np.uint8:
        out = image
    elif np.issubdtype(image.dtype, np.floating):
        if not np.isfinite(image).all():
            raise InvalidImage(f"{what}: float image contains NaN or infinity")
        low, high = float(image.min()), float(image.max())
        if low < 0 or high > 1:
            raise InvalidImage(f"{what}: float images must hold values in [0, 1]; found [{low:g}, {high:g}]")
        out = np.rint(image * 255).astype(np.uint8)
    else:
        raise InvalidImage(f"{what}: array dtype {image.dtype} is not supported; use uint8 (0..255) or float (0..1)")
    if out.shape[2] == 1:
        out = np.repeat(out, 3, axis=2)
    elif out.shape[2] == 4:
        alpha = out[:, :, 3:4].astype(np.float32) / 255
        out = np.rint(out[:, :, :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)
    return np.ascontiguousarray(out)


def image_inputs(inputs: Any, what: str = "inputs") -> tuple[list[Any], bool]:
    """One image or a non-empty list of them -> (the undecoded images, whether one was given)."""
    import numpy as np

    if isinstance(inputs, (list, tuple)):
        if not inputs:
            raise InvalidImage(f"{what}: empty list of images")
        return list(inputs), False
    if isinstance(inputs, np.ndarray) and inputs.ndim == 4:
        return list(inputs), False
    if inputs is None:
        raise InvalidImage(f"{what}: no image given")
    return [inputs], True


def decode_images(inputs: Any, what: str = "inputs", max_pixels: int | None = None,
                  max_images: int | None = None) -> tuple[list[Any], bool]:
    """One image or a non-empty list of them -> (RGB PIL images, whether a single image was given).
    More than ``max_images`` images are refused before any is decoded."""
    images, single = image_inputs(inputs, what)
    if max_images is not None and len(images) > max_images:
        raise InvalidImage(f"{what}: {len(images)} images exceed the limit of {max_images} per request "
                           "(executors.ml max_images); send them in several requests")
    prefix = what if single else None
    return [decode_image(image, prefix or f"{what}[{i}]", max_pixels) for i, image in enumerate(images)], single


def _size(value: Any, source: str, key: str) -> dict[str, int]:
    if isinstance(value, int):
        return {"height": value, "width": value}
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        return {"height": int(value[0]), "width": int(value[1])}
    if isinstance(value, Mapping) and (set(value) >= {"height", "width"} or "shortest_edge" in value):
        return {k: int(v) for k, v in value.items() if v is not None}
    raise ModelError(f"{source}: {key} must be an int, [height, width] or a table with height/width or "
                     f"shortest_edge, not {value!r}")


@attrs.frozen
class Preprocessing:
    """What ``preprocessor_config.json`` asks for (the defaults are transformers' ViT processor's)."""

    resize: dict[str, int] | None = attrs.field(factory=lambda: {"height": 224, "width": 224})
    resample: int = 2
    crop: dict[str, int] | None = None
    rescale: float | None = 1 / 255
    mean: tuple[float, ...] | None = (0.5, 0.5, 0.5)
    std: tuple[float, ...] | None = (0.5, 0.5, 0.5)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], source: str = "preprocessor_config.json") -> Preprocessing:
        try:
            resize = _size(config.get("size", {"height": 224, "width": 224}), source, "size") \
                if config.get("do_resize", True) else None
            crop = _size(config.get("crop_size", {"height": 224, "width": 224}), source, "crop_size") \
                if config.get("do_center_crop", False) else None
            if crop is not None and "shortest_edge" in crop:
                crop = {"height": crop["shortest_edge"], "width": crop["shortest_edge"]}
            resample = config.get("resample", 2)
            if isinstance(resample, str):
                resample = _RESAMPLE_NAMES[resample.lower()]
            rescale = float(config.get("rescale_factor", 1 / 255)) if config.get("do_rescale", True) else None
            mean = std = None
            if config.get("do_normalize", True):
                mean, std = _triple(config.get("image_mean", (0.5,) * 3)), _triple(config.get("image_std", (0.5,) * 3))
                if any(s <= 0 for s in std):
                    raise ValueError(f"image_std must be positive, not {list(std)}")
            return cls(resize, int(resample), crop, rescale, mean, std)
        except (TypeError, ValueError, KeyError) as exc:
            raise ModelError(f"{source}: invalid image preprocessing: {type(exc).__name__}: {exc}") from exc

    @classmethod
    def from_folder(cls, folder: str | Path) -> Preprocessing:
        path = Path(folder) / "preprocessor_config.json"
        if not path.is_file():
            return cls()
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ModelError(f"{path}: cannot read: {exc}") from exc
        if not isinstance(data, dict):
            raise ModelError(f"{path}: expected a JSON object")
        return cls.from_config(data, str(path))

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(height, width) of every preprocessed image, when fixed."""
        if self.crop is not None:
            return self.crop["height"], self.crop["width"]
        if self.resize is not None and "height" in self.resize:
            return self.resize["height"], self.resize["width"]
        return None

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after the resize step, as transformers computes it."""
        r = self.resize
        if r is None:
            return width, height
        if "shortest_edge" in r:
            short, long = (width, height) if width <= height else (height, width)
            new_short = r["shortest_edge"]
            new_long = int(new_short * long / short)
            if "longest_edge" in r and new_long > r["longest_edge"]:
                new_short, new_long = int(r["longest_edge"] * new_short / new_long), r["longest_edge"]
            return (new_short, new_long) if width <= height else (new_long, new_short)
        return r["width"], r["height"]

    def check_size(self, width: int, height: int, what: str = "image", max_pixels: int | None = None) -> None:
        """Refuse an image whose resized (or centre-padded) intermediate would exceed ``max_pixels``:
        resizing the short side of a 1x4000 image to 256 makes it 256 x 1,024,000, so the limit
        must hold for every image that is allocated, not only for the input."""
        max_pixels = MAX_PIXELS if max_pixels is None else max_pixels
        rw, rh = self.resized_size(width, height)
        if rw < 1 or rh < 1:
            raise InvalidImage(f"{what}: {width}x{height} resizes to {rw}x{rh}, which has no pixels")
        if rw * rh > max_pixels:
            raise _too_large(what, rw, rh, max_pixels, f"{width}x{height} resizes to ")
        if self.crop is not None:
            cw, ch = max(rw, self.crop["width"]), max(rh, self.crop["height"])
            if cw * ch > max_pixels:
                raise _too_large(what, cw, ch, max_pixels, "the centre crop pads to ")

    def pixels(self, image: Any, what: str = "image", max_pixels: int | None = None) -> Any:
        """One RGB PIL image -> a float32 CHW tensor (sizes checked before anything is allocated)."""
        import numpy as np
        import torch

        width, height = image.size
        self.check_size(width, height, what=what, max_pixels=max_pixels)
        size = self.resized_size(width, height)
        if size != image.size:
            image = image.resize(size, resample=self.resample)
        array = np.asarray(image)
        if self.crop is not None:
            array = _center_crop(array, self.crop["height"], self.crop["width"])
        # rescale and normalise as one multiply-add per channel, on the cropped pixels only
        scale = np.full(3, self.rescale if self.rescale is not None else 1.0, np.float64)
        shift = np.zeros(3, np.float64)
        if self.mean is not None and self.std is not None:
            scale, shift = scale / np.asarray(self.std), -np.asarray(self.mean) / np.asarray(self.std)
        out = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))).float()
        scale_t = torch.from_numpy(scale.astype(np.float32))[:, None, None]
        shift_t = torch.from_numpy(shift.astype(np.float32))[:, None, None]
        return out.mul_(scale_t).add_(shift_t)

    def batch(self, images: Sequence[Any], max_pixels: int | None = None) -> Any:
        """RGB PIL images -> one float32 NCHW tensor (all images must come out the same size)."""
        import torch

        for i, image in enumerate(images):  # every image is checked before the first is resized
            width, height = image.size
            self.check_size(width, height, what=f"inputs[{i}]", max_pixels=max_pixels)
        tensors = [self.pixels(image, f"inputs[{i}]", max_pixels) for i, image in enumerate(images)]
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) > 1:
            raise InvalidImage(f"images preprocess to different sizes {sorted(shapes)}; send them one at a time")
        return torch.stack(tensors)


def _triple(value: Any) -> tuple[float, ...]:
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    out = tuple(float(v) for v in value)
    if len(out) != 3:
        raise ValueError(f"expected 3 channel values, not {list(out)}")
    return out


def _center_crop(array: Any, height: int, width: int) -> Any:
    """transformers' centre crop: pads with zeros when the image is smaller than the crop."""
    import numpy as np

    h, w = array.shape[:2]
    if h < height or w < width:
        padded = np.zeros((max(h, height), max(w, width), array.shape[2]), array.dtype)
        top, left = (padded.shape[0] - h) // 2, (padded.shape[1] - w) // 2
        padded[top:top + h, left:left + w] = array
        array, h, w = padded, padded.shape[0], padded.shape[1]
    top, left = (h - height) // 2, (w - width) // 2
    return array[top:top + height, left:left + width]
