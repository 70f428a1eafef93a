"""``edgecompute-ml`` (docs/ml.md, "Package layout and command line"): list, check, convert."""

from __future__ import annotations

import json

import pytest
import torch

from edgecompute_ml.cli import main

from .test_gguf import write_gguf


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_list_shows_the_configured_models_from_their_headers(tmp_path, capsys, tiny_llama, tiny_bert):
    config = tmp_path / "edgecompute.toml"
    config.write_text(f"""
[executors.ml]
demo_models = false
default_models = {{ embeddings = "bert" }}
models = {{ llama = "{tiny_llama}", bert = {{ path = "{tiny_bert}" }}, gone = "{tmp_path / 'missing'}" }}
""")
    code, out, _ = _run(capsys, "list", "--config", str(config))
    assert code == 0
    listed = json.loads(out)
    assert listed["models"]["llama"]["family"] == "llama"
    assert listed["models"]["llama"]["task"] == "ml/text-generation"
    assert listed["models"]["bert"]["task"] == "ml/embeddings"
    assert listed["models"]["llama"]["parameters"] > 0
    # a model that cannot load is listed with the error the executor would raise
    assert "ModelError" in listed["models"]["gone"]["error"]
    assert listed["default_models"] == {"embeddings": "bert"}


def test_list_refuses_a_bad_ml_table(tmp_path, capsys):
    config = tmp_path / "edgecompute.toml"
    config.write_text("[executors.ml]\nmax_batch = 0\n")
    code, out, err = _run(capsys, "list", "--config", str(config))
    assert (code, out) == (1, "")
    assert err.startswith("edgecompute-ml: error:") and "max_batch must be an integer >= 1" in err


def test_check_describes_a_model_or_names_the_problem(tmp_path, capsys, tiny_bert):
    code, out, _ = _run(capsys, "check", str(tiny_bert))
    assert code == 0 and json.loads(out)["family"] == "bert"
    code, out, err = _run(capsys, "check", str(tiny_bert), "--dtype", "complex64")
    assert (code, out) == (1, "") and "dtype 'complex64' is not supported" in err
    code, out, err = _run(capsys, "check", str(tmp_path))
    assert (code, out) == (1, "") and "has no config.json" in err


def test_convert_writes_a_gguf_file_as_a_folder_the_store_loads(tmp_path, capsys, tiny_llama):
    from edgecompute_ml._runtime.plan import ModelSource
    from edgecompute_ml._runtime.store import inspect_model, load_model

    gguf_file = tmp_path / "tiny.gguf"
    write_gguf(tiny_llama, gguf_file)
    code, out, _ = _run(capsys, "convert", str(gguf_file), str(tmp_path / "out"))
    assert code == 0 and out.strip() == str(tmp_path / "out")
    converted = load_model(inspect_model(ModelSource("c", out.strip())), "float32", "cpu")
    original = load_model(inspect_model(ModelSource("o", str(tiny_llama))), "float32", "cpu")
    ids = torch.tensor([original.tokenizer.encode("hello world").ids])
    torch.testing.assert_close(converted.model.forward(ids, converted.model.new_cache(16), last_only=False),
                               original.model.forward(ids, original.model.new_cache(16), last_only=False),
                               atol=1e-5, rtol=0)
    code, out, err = _run(capsys, "convert", str(tmp_path), str(tmp_path / "again"))
    assert (code, out) == (1, "") and "nothing to convert" in err
