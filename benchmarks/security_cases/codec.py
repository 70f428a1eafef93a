"""Hostile answers from wasm/python guests: what the host's decoder of guest answers refuses.

The guest is the attacker here: its return value is what the host decodes (``_codec.decode``).
Each attack ends in ``SandboxCrashed`` ("the guest sent an answer the host cannot read: ...")
within the request's deadline and with at most 8 x the answer's size of host memory; the dense
answer at the end is accepted, the same bound holding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgecompute.models import Request

from . import Case

# an operator who raised the answer cap to 16 MiB (the default is 4 MiB): the decoder meets the biggest answers
_CONFIG = {"memory_mb": 512.0, "pool_size": 1, "result_bytes": 16 * 2**20}


def _normal() -> Request:
    return Request("wasm/python", [1, 2, 3], params={"source": "def main(x):\n    return sum(x)"})


def _guest(source: str) -> Any:
    return lambda: Request("wasm/python", None, params={"source": source})


def _length(n: int) -> Any:
    def check(outputs: Any) -> str | None:
        return None if isinstance(outputs, list) and len(outputs) == n else "the dense answer did not come back whole"
    return check


def _crafted(body: str) -> Any:
    """A guest that hands the host bytes of its own making: it swaps its ``marshal.dumps`` (which
    the guest's bootstrap calls to encode the answer) for one returning ``("ok", <body>)`` where
    ``body`` is an expression building raw marshal bytes; nothing stops untrusted code doing this."""
    return _guest(
        "import marshal\n"
        "def main(x):\n"
        "    P = (1 << 61) - 1\n"
        f"    answer = b'(\\x02\\x00\\x00\\x00' + marshal.dumps('ok', 2) + {body}\n"
        "    marshal.dumps = lambda value, version=2: answer\n"
        "    return None\n")


def cases(tmp: Path) -> list[Case]:
    crashed = "SandboxCrashed"
    return [
        Case("wasm codec: a 400 KB int answer (quadratic to decode digit by digit)", "wasm",
             _guest("def main(x):\n    return 1 << 3_200_000"), _normal, crashed, dict(_CONFIG)),
        Case("wasm codec: 10 MB of empty lists (12.8 x its size in host memory)", "wasm",
             _guest("def main(x):\n    return [[] for _ in range(2_000_000)]"), _normal, crashed, dict(_CONFIG)),
        Case("wasm codec: 4 MB of empty dicts (36 x its size in host memory)", "wasm",
             _guest("def main(x):\n    return [{} for _ in range(2_000_000)]"), _normal, crashed, dict(_CONFIG)),
        Case("wasm codec: crafted dict of 500k int keys sharing one hash", "wasm",
             _crafted("b'{' + b''.join(marshal.dumps(i * P + 7, 2) + b'N' for i in range(500_000)) + b'0'"),
             _normal, crashed, dict(_CONFIG)),
        Case("wasm codec: crafted answer nested 10**6 deep", "wasm",
             _crafted("b'[\\x01\\x00\\x00\\x00' * 10**6 + b'N'"), _normal, crashed, dict(_CONFIG)),
        Case("wasm codec: crafted list claiming 2**31-1 items", "wasm",
             _crafted("b'[\\xff\\xff\\xff\\x7f' * 1000 + b'N'"), _normal, crashed, dict(_CONFIG)),
        Case("wasm codec: set of 17 floats sharing one hash", "wasm",
             _guest("def main(x):\n    return {float(2**e) for e in range(0, 1024, 61)}"), _normal, crashed,
             dict(_CONFIG)),
        Case("wasm codec: dense 15 MB answer of 3M int32 is accepted", "wasm",
             _guest("def main(x):\n    return list(range(10**6, 4 * 10**6))"), _normal, None, dict(_CONFIG),
             check=_length(3 * 10**6)),
    ]
