"""A plain script using the ml executor through Runtime; it must exit with code 0 every time.

``python tests/security/ml_exit_script.py`` runs the reported case (the installed all-MiniLM-L6-v2,
every discovered executor); ``python tests/security/ml_exit_script.py MODEL_FOLDER`` runs it on a
BERT folder of one's own (the tests pass a tiny one). Before aclose() joined the batcher and CPU
split threads, about 1 run in 10 aborted at exit ("terminate called without an active exception").
"""

from __future__ import annotations

import asyncio
import sys

from edgecompute import Registry, Runtime

TEXTS = ["A man is eating food.", "A man eats bread.", "The capital of France is Paris."]

if __name__ == "__main__":
    if len(sys.argv) > 1:
        from edgecompute_ml.executor import MLExecutor

        executor = MLExecutor(config={"models": {"m": sys.argv[1]}, "demo_models": False,
                                      "default_models": {"embeddings": "m"}})
        registry = Registry([executor])
        with Runtime(registry) as rt:
            assert len(rt.run("ml/embeddings", TEXTS).outputs) == len(TEXTS)
        asyncio.run(registry.aclose())  # a registry passed in is closed by its owner
    else:
        with Runtime() as rt:
            assert len(rt.run("ml/embeddings", TEXTS, params={"model": "all-minilm-l6-v2"}).outputs) == len(TEXTS)
