"""How long decoding a guest's answer takes and how much host memory it makes, for hostile shapes.

    python benchmarks/codec.py [--mib 4] [--repeat 3] [--only NAME]

Every answer is about ``--mib`` MiB (the default result cap, 4 MiB), built the way a guest would
send it (``marshal.dumps(value, 2)``, or raw bytes where marshal cannot make the shape). For each:
the decoder's best time of ``--repeat`` runs, its peak traced allocation (``tracemalloc``) divided
by the answer's size, and the same for ``marshal.loads`` on the same bytes (the C baseline; "-"
where marshal refuses the bytes or where handing them to it would be unsafe). "refused" names the
CodecError's first words: the shape was stopped, and the seconds/peak say how fast and how cheaply.
"""

from __future__ import annotations

import argparse
import gc
import marshal
import struct
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "edgecompute_wasm" / "src"))

from edgecompute_wasm._codec import MAX_DEPTH, CodecError, decode, memory_budget

_P = (1 << 61) - 1  # ints equal modulo this share their hash


def _fill(size: int, item_bytes: int) -> int:
    return max(1, (size - 5) // item_bytes)


def shapes(size: int) -> list[tuple[str, Callable[[], bytes], bool]]:
    """(name, builder, safe for marshal.loads)."""
    dump = lambda value: marshal.dumps(value, 2)  # noqa: E731
    return [
        ("list of None", lambda: dump([None] * _fill(size, 1)), True),
        ("list of bools", lambda: dump([i % 3 == 0 for i in range(_fill(size, 1))]), True),
        ("list of small ints 0..255", lambda: dump([i % 256 for i in range(_fill(size, 5))]), True),
        ("list of int32", lambda: dump([1_000_000 + i for i in range(_fill(size, 5))]), True),
        ("list of floats", lambda: dump([i * 0.5 for i in range(_fill(size, 9))]), True),
        ("list of 4300-digit ints", lambda: dump([10**4299 + i for i in range(_fill(size, 1911))]), True),
        ("one int of 400 KB (red team)", lambda: dump(1 << (8 * 400_000 - 1)), True),
        ("list of 64-bit ints", lambda: dump([(1 << 40) + i for i in range(_fill(size, 11))]), True),
        ("list of empty lists", lambda: dump([[] for _ in range(_fill(size, 5))]), True),
        ("list of empty dicts", lambda: dump([{} for _ in range(_fill(size, 2))]), True),
        ("list of empty tuples", lambda: dump([() for _ in range(_fill(size, 5))]), True),
        ("list of empty str", lambda: dump([""] * _fill(size, 5)), True),
        ("list of 1-char str", lambda: dump([chr(97 + i % 26) for i in range(_fill(size, 6))]), True),
        ("list of 3-char str", lambda: dump([f"{i % 1000:03d}" for i in range(_fill(size, 8))]), True),
        ("list of words 1-12 chars", lambda: dump(["w" * (1 + i % 12) for i in range(_fill(size, 11))]), True),
        ("list of 2-int tuples", lambda: dump([(i, i + 1000) for i in range(_fill(size, 15))]), True),
        ("list of small-int pairs", lambda: dump([(i % 200, 7) for i in range(_fill(size, 15))]), True),
        ("list of [x, y] float points", lambda: dump([[i * 0.5, -i * 0.25] for i in range(_fill(size, 23))]), True),
        ("list of (int, str) pairs", lambda: dump([(i % 200, f"k{i % 97}") for i in range(_fill(size, 17))]), True),
        ("list of records {id, name}", lambda: dump([{"id": 1000 + i, "name": f"n{i}"}
                                                      for i in range(_fill(size, 40))]), True),
        ("matrix 1024 cols of floats", lambda: dump([[float(c) for c in range(1024)]
                                                     for _ in range(_fill(size, 9 * 1024 + 5))]), True),
        ("one str", lambda: dump("x" * (size - 5)), True),
        ("one non-ASCII str", lambda: dump("\U0001f600" * ((size - 5) // 4)), True),
        ("one bytes", lambda: dump(b"x" * (size - 5)), True),
        # written by hand: building the dict itself would take the quadratic time the decoder refuses
        ("dict of colliding int keys", lambda: b"{" + b"".join(dump(i * _P + 7) + b"N"
                                                              for i in range(_fill(size, 16))) + b"0", False),
        ("set of 17 floats sharing a hash", lambda: dump({float(2**e) for e in range(0, 1024, 61)}), False),
        ("set of 2**40-strided int keys", lambda: dump({i << 40 for i in range(_fill(size, 11))}), True),
        (f"nesting {MAX_DEPTH} deep", lambda: b"[\x01\x00\x00\x00" * MAX_DEPTH + b"N", True),
        ("nesting 10**6 deep", lambda: b"[\x01\x00\x00\x00" * 10**6 + b"N", False),
        ("huge declared lengths", lambda: b"[\xff\xff\xff\x7f" + b"[\xff\xff\xff\x7f" * (size // 10), False),
        ("list claiming 2**31-1 items", lambda: b"[\xff\xff\xff\x7f" + b"N" * (size - 5), False),
        ("str claiming more than sent", lambda: b"u" + struct.pack("<i", size) + b"x" * (size - 10), False),
    ]


def _measure(fn: Callable[[bytes], object], data: bytes, repeat: int) -> tuple[float, float, str]:
    best = float("inf")
    outcome = "ok"
    for _ in range(repeat):
        gc.collect()
        # CPU time, not wall time: the machines this runs on are shared
        t0 = time.process_time()
        try:
            value = fn(data)
        except (CodecError, ValueError, EOFError, TypeError) as exc:
            value = None
            outcome = f"refused: {' '.join(str(exc).split()[:5])}"
        best = min(best, time.process_time() - t0)
        del value
    gc.collect()
    tracemalloc.start()
    try:
        value = fn(data)
    except (CodecError, ValueError, EOFError, TypeError):
        value = None
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del value
    if fn is decode and peak > memory_budget(len(data)):
        outcome += f" OVER THE BUDGET ({peak} > {memory_budget(len(data))} bytes)"
    return best, peak / len(data), outcome


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=float, default=4.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", default=None, help="run only shapes whose name contains this")
    args = parser.parse_args()
    size = int(args.mib * 2**20)
    print(f"python {sys.version.split()[0]}, answers of about {args.mib:g} MiB; seconds are CPU seconds of this "
          f"process (time.process_time), the best of {args.repeat}")
    print()
    print("| shape | answer bytes | decode s | decode peak / bytes | marshal.loads s | marshal peak / bytes "
          "| outcome |")
    print("|---|---:|---:|---:|---:|---:|---|")
    worst_time = worst_ratio = 0.0
    for name, build, safe in shapes(size):
        if args.only and args.only not in name:
            continue
        data = build()
        seconds, ratio, outcome = _measure(decode, data, args.repeat)
        worst_time, worst_ratio = max(worst_time, seconds), max(worst_ratio, ratio)
        if safe:
            m_seconds, m_ratio, m_outcome = _measure(marshal.loads, data, args.repeat)
            baseline = (f"{m_seconds:.3f} | {m_ratio:.2f}" if m_outcome == "ok"
                        else f"- ({m_outcome.removeprefix('refused: ')}) | -")
        else:
            baseline = "- (unsafe) | -"
        print(f"| {name} | {len(data)} | {seconds:.3f} | {ratio:.2f} | {baseline} | {outcome} |", flush=True)
    print()
    print(f"worst decode time {worst_time:.3f} s, worst peak {worst_ratio:.2f} x the answer")


if __name__ == "__main__":
    main()
