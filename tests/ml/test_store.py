"""Model folders: headers validated before loading, errors that say what is wrong and where."""

from __future__ import annotations

import json
import shutil
import struct

import pytest

from edgecompute.errors import EdgeComputeError
from edgecompute_ml._formats.safetensors import Checkpoint, read_header
from edgecompute_ml._runtime.plan import ModelSource
from edgecompute_ml._runtime.store import inspect_model
from edgecompute_ml.errors import ModelError, ShapeMismatch, UnsupportedArchitecture


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_shape_mismatch_names_file_tensor_and_both_shapes(tiny_llama, tmp_path):
    folder = _copy(tiny_llama, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 100
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ShapeMismatch) as info:
        inspect_model(ModelSource("m", str(folder)))
    message = str(info.value)
    assert "model.safetensors" in message
    assert "model.layers.0.mlp.gate_proj.weight" in message
    assert "[96, 64]" in message and "[100, 64]" in message
    assert isinstance(info.value, EdgeComputeError)


def test_missing_tensor_is_named(tiny_llama, tmp_path):
    folder = _copy(tiny_llama, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=r"model\.layers\.2\.self_attn\.q_proj\.weight.*missing"):
        inspect_model(ModelSource("m", str(folder)))


def test_untied_model_needs_lm_head(tiny_llama, tmp_path):
    folder = _copy(tiny_llama, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["tie_word_embeddings"] = False
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="lm_head.weight"):
        inspect_model(ModelSource("m", str(folder)))


def test_unsupported_architecture_lists_supported(tiny_llama, tmp_path):
    folder = _copy(tiny_llama, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["model_type"], config["architectures"] = "gpt_neox", ["GPTNeoXForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitecture, match=r"GPTNeoXForCausalLM.*supported: .*BertModel.*LlamaForCausalLM"):
        inspect_model(ModelSource("m", str(folder)))


def test_corrupt_headers_are_rejected_with_the_file_name(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x01")
    with pytest.raises(ModelError, match="bad.safetensors"):
        read_header(path)
    path.write_bytes(struct.pack("<Q", 10**9) + b"{}")
    with pytest.raises(ModelError, match="exceeds the file"):
        read_header(path)
    body = json.dumps({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 60]}}).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + b"\0" * 64)
    with pytest.raises(ModelError, match=r"'w'.*64 bytes"):
        read_header(path)
    body = b"{not json"
    path.write_bytes(struct.pack("<Q", len(body)) + body)
    with pytest.raises(ModelError, match="corrupt safetensors header"):
        read_header(path)


def test_missing_shard_is_reported(tiny_llama_sharded, tmp_path):
    folder = _copy(tiny_llama_sharded, tmp_path / "m")
    victim = sorted(folder.glob("model-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(ModelError, match=f"shard '{victim.name}'.*missing"):
        Checkpoint(folder)


def test_estimate_comes_from_headers(tiny_llama):
    plan = inspect_model(ModelSource("m", str(tiny_llama)))
    params = sum(info.numel for info in Checkpoint(tiny_llama).tensors.values())
    assert plan.weight_bytes(4) == params * 4
    assert plan.weight_bytes(2) == params * 2


def test_not_a_model(tmp_path):
    with pytest.raises(ModelError, match="neither a model folder nor a .gguf file"):
        inspect_model(ModelSource("m", str(tmp_path / "nothing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        inspect_model(ModelSource("m", str(tmp_path / "empty")))
