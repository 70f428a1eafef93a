"""Image decoding and preprocessing: accepted forms, typed errors for everything else."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

PIL = pytest.importorskip("PIL")

from PIL import Image  # noqa: E402

from edgecompute_ml._preprocessing.image import Preprocessing, decode_image, decode_images  # noqa: E402
from edgecompute_ml.errors import InvalidImage, ModelError  # noqa: E402


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.sampled_from([None, 1, 3, 4]), st.integers(0, 2**32 - 1))
def test_uint8_arrays_decode_to_rgb_of_the_same_size(height, width, channels, seed):
    shape = (height, width) if channels is None else (height, width, channels)
    array = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    image = decode_image(array)
    assert image.mode == "RGB" and image.size == (width, height)
    if channels == 3:
        assert np.array_equal(np.asarray(image), array)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_decode_or_raise_invalid_image(data):
    try:
        image = decode_image(data)
    except InvalidImage:
        return
    assert image.mode == "RGB"


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(["PNG", "JPEG", "BMP", "GIF", "WEBP"]), st.integers(0, 1000))
def test_encoded_images_round_trip(fmt, seed):
    array = np.random.default_rng(seed).integers(0, 256, (17, 23, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    image = decode_image(buffer.getvalue())
    assert image.size == (23, 17)
    if fmt in ("PNG", "BMP"):  # lossless
        assert np.array_equal(np.asarray(image), array)


def test_transparent_pixels_become_white_and_exif_rotation_is_applied():
    rgba = np.zeros((2, 2, 4), np.uint8)
    assert np.array_equal(np.asarray(decode_image(rgba)), np.full((2, 2, 3), 255))
    buffer = io.BytesIO()
    image = Image.fromarray(np.zeros((10, 30, 3), np.uint8))
    exif = image.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees
    image.save(buffer, format="JPEG", exif=exif)
    assert decode_image(buffer.getvalue()).size == (10, 30)


def test_batches_of_arrays_and_lists():
    stack = np.zeros((3, 8, 9, 3), np.uint8)
    images, single = decode_images(stack)
    assert len(images) == 3 and not single
    images, single = decode_images(stack[0])
    assert len(images) == 1 and single


def test_oversized_images_are_refused_before_decoding(monkeypatch):
    import edgecompute_ml._preprocessing.image as image_module

    monkeypatch.setattr(image_module, "MAX_PIXELS", 100)
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(buffer, format="PNG")
    with pytest.raises(InvalidImage, match="exceed"):
        decode_image(buffer.getvalue())
    with pytest.raises(InvalidImage, match="exceed"):
        decode_image(np.zeros((20, 20, 3), np.uint8))


def test_preprocessing_config_is_read_and_checked():
    p = Preprocessing.from_config({"size": {"shortest_edge": 256}, "do_center_crop": True,
                                   "crop_size": {"height": 224, "width": 224}, "resample": 3,
                                   "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]})
    assert p.output_size == (224, 224)
    assert p.resized_size(500, 300) == (426, 256)
    assert p.pixels(Image.new("RGB", (500, 300))).shape == (3, 224, 224)
    assert Preprocessing.from_config({"size": 64}).output_size == (64, 64)
    assert Preprocessing.from_config({"do_resize": False, "do_center_crop": False}).output_size is None
    with pytest.raises(ModelError, match="size"):
        Preprocessing.from_config({"size": "big"})
    with pytest.raises(ModelError, match="image_std"):
        Preprocessing.from_config({"image_std": [0, 1, 1]})
