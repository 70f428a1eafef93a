"""Values crossing the sandbox boundary.

Host -> guest: ``marshal.dumps(value, 2)`` (the guest's ``marshal`` is built in, so decoding costs
no import). Guest -> host: the guest encodes with marshal version 2 as well, but the host never
hands guest bytes to ``marshal.loads`` (which trusts its input: it allocates whatever a length
claims, builds code objects and has no deadline). :func:`decode` is a strict parser of the data
subset only (None, bool, int, float, complex, str, bytes, tuple, list, dict, set, frozenset).

Guest bytes are hostile, so the parser is built to stay linear in time and bounded in memory:

* **Memory.** Every object is charged (its ``sys.getsizeof`` on CPython 3.11, or an upper bound
  of it) against a budget *before* it is made; the default budget is ``MEMORY_RATIO`` (8) times the
  answer's size plus ``MEMORY_SLACK`` (64 KiB, for the few fixed-size objects every answer makes).
  Temporaries (the list a tuple or set is built from, a dict's table while it grows, the chunks
  of a bulk conversion) are charged while they live, so the budget bounds the peak (as
  ``tracemalloc`` sees it), not just the result. 16 KiB of it is kept back for the interpreter's
  own short-lived objects. Not counted: the copy ``bytes(data)`` makes of a memoryview or
  bytearray answer (1 x its size).
* **Time.** Work is linear in the answer's size: ints are assembled from their 15-bit digits
  with O(log n) whole-number operations (no digit-by-digit shifting), dict/set building is
  protected against hash flooding (below), and every item costs a bounded number of steps. Runs
  of equal-shaped items (None/True/False, int32, float, 31-60 bit ints, empty str/bytes/tuple/
  list/dict, one-character str) are converted by C loops a chunk at a time; other items go
  through the general loop (about 1 us of CPU each). The clock is read every ``_CHECK_EVERY``
  items and every chunk, so a ``deadline`` stops the decoder with :class:`CodecTimeout`.
* **Ints** have at most ``MAX_INT_DIGITS`` (4300) decimal digits: CPython refuses to turn longer
  ints into text (``sys.int_info.default_max_str_digits``), so a longer one could not be printed or
  JSON-encoded by the host anyway.
* **Hash flooding.** Building a dict or set is quadratic when many distinct keys share one
  ``hash()``: every insert walks the same probe chain. ``str`` and ``bytes`` hashes are keyed
  with a per-process random key (SipHash), and distinct ints below 2**61 - 1 have distinct hashes
  (an int's hash is itself modulo 2**61 - 1), so only the other keys (bigger ints, floats,
  complex, tuples, frozensets, None) can be chosen to collide. Their hashes are counted per
  container, and more than ``MAX_SAME_HASH`` of them on one hash value is refused; every probe
  chain is then at most ``MAX_SAME_HASH`` + 2 keys long (the +2: one small int, and -1/-2 which
  share a hash). Keys that only share their low bits are spread by CPython's probe perturbation.
  Duplicate keys are refused too: an encoder of a real dict or set never writes one.
* **Depth.** Containers nest at most ``MAX_DEPTH`` (200) deep (scalars may sit inside the 200th);
  the parser takes two or three Python frames per level, which CPython 3.11 runs without
  growing the C stack, well below the default recursion limit (1000), and a depth that ``json``
  and the gateway's wire format accept.
* Marshal version 4's extra codes (short strings, small tuples, interned strings) are still
  accepted for older guests; references (flag 0x80) are not, so nothing can be shared.
"""

from __future__ import annotations

import array
import marshal
import struct
import sys
import time
from collections.abc import Callable
from typing import Any, NoReturn

__all__ = [
    "MAX_DEPTH",
    "MAX_INT_DIGITS",
    "MAX_SAME_HASH",
    "MEMORY_RATIO",
    "MEMORY_SLACK",
    "CodecError",
    "CodecTimeout",
    "decode",
    "encode",
    "memory_budget",
]

MAX_DEPTH = 200  # containers nested deeper than this are refused
MAX_INT_DIGITS = 4300  # CPython's default int <-> str limit: longer ints could not be printed or sent as JSON
MEMORY_RATIO = 8  # the decoded value may take at most this many times the answer's size ...
MEMORY_SLACK = 64 * 1024  # ... plus this, for the fixed-size objects every answer makes
MAX_SAME_HASH = 8  # keys of one dict/set (other than str, bytes, small ints) sharing one hash value

_RESERVE = 16 * 1024  # of the budget, kept for the interpreter's temporaries (see decode)
_CHECK_EVERY = 1024  # items between two looks at the clock
_CHUNK = 1024  # items converted per C call in a run: bounds the temporaries to about 40 KiB

_I32 = struct.Struct("<i")
_F64 = struct.Struct("<d")
_C128 = struct.Struct("<dd")
_INT_LIMIT = 10**MAX_INT_DIGITS
# a normalized long of n 15-bit digits is >= 2 ** (15 * (n - 1)): from this many on it has > 4300 digits
_MAX_LONG_DIGITS = next(n for n in range(1, 2000) if 2 ** (15 * n) >= _INT_LIMIT)
_LOW7 = bytes(range(128))
_SMALL_HASH = (1 << 61) - 1  # ints below this in size hash to themselves (but -1 -> -2)

# sizes of CPython 3.11 objects on a 64-bit build (sys.getsizeof, GC header included)
_PTR = 8
_LIST = 56
_TUPLE = 40
_FLOAT = 24
_COMPLEX = 32
_BYTES = 33
_ASCII = 49
# an int of d 30-bit digits: 28 + 4 d (sys.getsizeof says 24 + 4 d, but CPython 3.11 allocates at least
# sizeof(PyLongObject), 32 bytes, as tracemalloc shows)
_INT_BASE = 28
# dicts and sets while they grow (old and new table alive at once), measured with tracemalloc for
# 1 .. 3 * 10**5 entries: a dict of m >= 1 entries peaks below 224 + 90 m bytes, a set below 216 + 138 m
_DICT_EMPTY, _DICT_FIRST, _DICT_ENTRY = 64, 160, 96
_SET_EMPTY, _SET_ENTRY = 216, 144
_KEY_CHARS, _KEYS = 64, 4096  # str dict keys up to this long are shared, up to this many distinct ones
_HASH_ENTRY = 96 + 32  # one entry of the per-container hash counter: its table share and the hash int

_ONE_BYTE = {ord("N"): None, ord("T"): True, ord("F"): False}
_ASCII_BYTES = bytes(range(128))
_ZERO = b"\x00"
_EMPTY_STRS: tuple[str, ...] = ("",) * _CHUNK
_EMPTY_BYTES: tuple[bytes, ...] = (b"",) * _CHUNK
_EMPTY_TUPLES: tuple[tuple[()], ...] = ((),) * _CHUNK
_MIN_RUN = 8  # shorter runs go through the general loop: setting up a C conversion costs more
# top byte of a little-endian int32 -> 1 when the value needs two 30-bit digits (|x| >= 2**30)
_BIG_I32 = bytes(1 if (b >> 6) in (1, 2) else 0 for b in range(256))
_NATIVE_LE = sys.byteorder == "little"
assert array.array("i").itemsize == 4 and array.array("d").itemsize == 8


class CodecError(ValueError):
    """The guest's answer is not plain data the host accepts (or passes a bound)."""


class CodecTimeout(CodecError):
    """The deadline passed while the answer was being decoded."""


def encode(value: Any) -> bytes:
    """Encode host data for the guest; raises ValueError for values that are not plain data."""
    return marshal.dumps(value, 2)


def memory_budget(size: int) -> int:
    """The most host memory (bytes) decoding an answer of ``size`` bytes may take by default."""
    return MEMORY_RATIO * size + MEMORY_SLACK


def decode(data: bytes | bytearray | memoryview, *, deadline: float | None = None,
           budget: int | None = None) -> Any:
    """Decode a guest's answer.

    ``deadline`` is a :func:`time.monotonic` time after which decoding stops with
    :class:`CodecTimeout`; ``budget`` caps the bytes of host memory the result (and the decoder's
    temporaries) may take, :func:`memory_budget` of the answer's size by default. Every other
    problem is a :class:`CodecError`.
    """
    raw = bytes(data)
    # the interpreter's own short-lived objects (loop counters, the error and its traceback) come
    # out of the budget too: the parser hands out all but _RESERVE of it
    limit = memory_budget(len(raw)) if budget is None else budget
    parser = _Parser(raw, max(0, limit - _RESERVE), deadline)
    parser.clock()
    try:
        value = parser.value(0)
    except RecursionError:  # only when the caller is already deep: MAX_DEPTH keeps ours shallow
        raise CodecError("the answer is nested too deeply for the host's stack") from None
    if parser.pos != len(raw):
        raise CodecError(f"{len(raw) - parser.pos} trailing bytes after the value")
    return value


def _bytes_ints(chunk: bytes, start: int, stride: int, count: int) -> int:
    """How many of the ``count`` int32s at ``start``, ``start + stride``, ... are in 0..255: their
    three high bytes are all zero. One OR of three whole numbers does it for all of them."""
    high = (int.from_bytes(chunk[start + 1::stride], "little") | int.from_bytes(chunk[start + 2::stride], "little")
            | int.from_bytes(chunk[start + 3::stride], "little"))
    return high.to_bytes(count, "little").count(0)


def _long(raw: bytes, size: int) -> int:
    """The int whose 15-bit digits are the little-endian uint16s in ``raw`` (``size`` of them)."""
    if size <= 16:
        result = 0
        for digit in reversed(struct.unpack(f"<{size}H", raw)):
            result = (result << 15) | digit
        return result
    # Pack pairs of neighbouring slots: the odd slot of each pair moves down over the even slot's
    # unused top bits. Each round is a few whole-number operations (linear in the size) and halves
    # the number of slots, so the total is O(n log n) machine words with a tiny constant, instead of
    # the O(n**2) of shifting in one digit at a time.
    slots = 1 << (size - 1).bit_length()
    value = int.from_bytes(raw + bytes(2 * (slots - size)), "little")
    width, bits = 16, 15  # slot width, meaningful bits per slot (both in bits)
    while slots > 1:
        half = width // 8
        even = value & int.from_bytes((b"\xff" * half + bytes(half)) * (slots // 2), "little")
        value = even | ((value ^ even) >> (width - bits))
        width, bits, slots = 2 * width, 2 * bits, slots // 2
    return value


class _Parser:
    __slots__ = ("data", "deadline", "end", "keys", "left", "pos", "ticks")

    def __init__(self, data: bytes, budget: int, deadline: float | None) -> None:
        self.data = data
        self.pos = 0
        self.end = len(data)
        self.left = budget  # bytes of host memory still allowed
        self.deadline = deadline
        self.ticks = 0
        # str dict keys seen so far: a list of records repeats the same few keys, and sharing one
        # object per key (as marshal's own references would) keeps records within the budget
        self.keys: dict[str, str] = {}

    # -- bounds -------------------------------------------------------------------------------------

    def charge(self, size: int) -> None:
        if size > self.left:
            self._too_big(size)
        self.left -= size

    def _too_big(self, size: int) -> NoReturn:
        raise CodecError(
            f"the answer ({self.end} bytes) decodes to more host memory than its budget of "
            f"{memory_budget(self.end)} bytes ({MEMORY_RATIO} x its size + {MEMORY_SLACK}); return fewer, "
            "larger values (str or bytes instead of many small containers or numbers)")

    def clock(self) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise CodecTimeout("the deadline passed while the host was decoding the guest's answer")

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if n < 0 or end > self.end:
            raise CodecError("truncated value")
        chunk = self.data[self.pos:end]
        self.pos = end
        return chunk

    def i32(self) -> int:
        if self.pos + 4 > self.end:
            raise CodecError("truncated value")
        n: int = _I32.unpack_from(self.data, self.pos)[0]
        self.pos += 4
        return n

    def count(self) -> int:
        n = self.i32()
        # every element needs at least one byte: a length beyond what is left is a lie
        if n < 0 or n > self.end - self.pos:
            raise CodecError(f"bad length {n}")
        return n

    # -- values -------------------------------------------------------------------------------------

    def value(self, depth: int) -> Any:
        # the common codes are handled inline, without helper calls: this is the per-item cost
        data, pos, end = self.data, self.pos, self.end
        if pos >= end:
            raise CodecError("truncated value")
        code = data[pos]
        pos += 1
        self.pos = pos
        if code == 117 or code == 116:  # u t
            if pos + 4 > end:
                raise CodecError("truncated value")
            n = _I32.unpack_from(data, pos)[0]
            pos += 4
            if n < 0 or pos + n > end:
                raise CodecError(f"bad length {n}")
            raw = data[pos:pos + n]
            self.pos = pos + n
            if raw.isascii():
                if n > 1:
                    size = _ASCII + n
                    if size > self.left:
                        self._too_big(size)
                    self.left -= size
                return raw.decode("ascii")
            return self._text(raw)
        if code == 105:  # i
            if pos + 4 > end:
                raise CodecError("truncated value")
            n = _I32.unpack_from(data, pos)[0]
            self.pos = pos + 4
            if not -5 <= n <= 256:  # the others are cached by CPython
                self.charge(_INT_BASE + (4 if -(1 << 30) < n < 1 << 30 else 8))
            return n
        if code == 103:  # g
            if pos + 8 > end:
                raise CodecError("truncated value")
            self.pos = pos + 8
            self.charge(_FLOAT)
            return _F64.unpack_from(data, pos)[0]
        if code == 78:  # N
            return None
        if code == 84:  # T
            return True
        if code == 70:  # F
            return False
        if code & 0x80:
            raise CodecError("references are not accepted")
        if code == 115:  # s
            n = self.count()
            self.charge(_BYTES + n)
            return self.take(n)
        if code in (40, 91, 60, 62):  # ( [ < >
            return self._container(code, self.count(), depth)
        if code == 41:  # ) small tuple
            return self._container(40, self.take(1)[0], depth)
        if code == 123:  # {
            return self._dict(depth)
        if code == 108:  # l
            return self._long()
        if code in (97, 65):  # a A
            return self._ascii(self.count())
        if code in (122, 90):  # z Z
            return self._ascii(self.take(1)[0])
        if code == 121:  # y
            self.charge(_COMPLEX)
            return complex(*_C128.unpack(self.take(16)))
        raise CodecError(f"type code {chr(code)!r} is not accepted")

    def _long(self) -> int:
        n = self.i32()
        size = abs(n)
        if size > _MAX_LONG_DIGITS:
            raise CodecError(f"an int with more than {MAX_INT_DIGITS} decimal digits is not accepted "
                             "(return it as str or bytes)")
        raw = self.take(2 * size)
        if size and raw[-2:] == b"\x00\x00":
            raise CodecError("bad int: unnormalized digits")
        # a 15-bit digit has its top bit clear: look at every odd byte at once
        if raw[1::2].translate(None, _LOW7):
            raise CodecError("bad int digit")
        self.charge(_INT_BASE + 4 * (size // 2 + 1) + 8 * len(raw) + 256)  # the int and its temporaries
        result = _long(raw, size)
        self.left += 8 * len(raw) + 256
        if result >= _INT_LIMIT:
            raise CodecError(f"an int with more than {MAX_INT_DIGITS} decimal digits is not accepted "
                             "(return it as str or bytes)")
        return -result if n < 0 else result

    def _text(self, raw: bytes) -> str:
        """UTF-8 text that is not ASCII."""
        # before decoding: at most 4 bytes per character (and fewer characters than bytes) ...
        n = len(raw)
        self.charge(72 + 4 * n)
        try:
            text = raw.decode("utf-8", "surrogatepass")
        except UnicodeDecodeError as exc:
            raise CodecError(f"bad text: {exc}") from None
        self.left += 72 + 4 * n - sys.getsizeof(text)  # ... then what it really took
        return text

    def _ascii(self, n: int) -> str:
        raw = self.take(n)
        if not raw.isascii():
            raise CodecError("bad ascii text")
        if n > 1:
            self.charge(_ASCII + n)
        return raw.decode("ascii")

    def _tick(self) -> None:
        self.ticks += 1
        if self.ticks >= _CHECK_EVERY:
            self.ticks = 0
            self.clock()

    def _container(self, code: int, n: int, depth: int) -> Any:
        if depth >= MAX_DEPTH:
            raise CodecError(f"value nested deeper than {MAX_DEPTH}")
        # _tick and charge written out: small containers are common and this is their fixed cost
        self.ticks += 1
        if self.ticks >= _CHECK_EVERY:
            self.ticks = 0
            self.clock()
        if n == 0:
            if code == 91:
                self.charge(_LIST)
                return []
            if code == 40:
                return ()
            self.charge(_SET_EMPTY)
            return set() if code == 60 else frozenset()
        listed = _LIST + _PTR * n
        if code == 40:  # a tuple is built from a list: both are alive for a moment
            listed += _TUPLE + _PTR * n
        elif code != 91:  # so is a set, whose table is known from n before any item is read
            listed += _SET_EMPTY + _SET_ENTRY * n
        if listed > self.left:
            self._too_big(listed)
        self.left -= listed
        if n < _MIN_RUN:  # too few for a run: skip _items' bookkeeping
            items = [None] * n
            value = self.value
            for i in range(n):
                items[i] = value(depth + 1)
        else:
            items = self._items(n, depth + 1)
        if code == 91:  # [
            return items
        if code == 40:  # (
            self.left += _LIST + _PTR * n  # the list goes once the tuple exists
            return tuple(items)
        self._hash_check(items)
        try:
            result: set[Any] | frozenset[Any] = set(items) if code == 60 else frozenset(items)
        except TypeError as exc:
            raise CodecError(str(exc)) from None
        if len(result) != n:
            raise CodecError("duplicate set element")
        self.left += listed - sys.getsizeof(result)
        return result

    def _hash_check(self, items: list[Any]) -> None:
        """Refuse more than MAX_SAME_HASH keys that can be made to collide on one hash value."""
        seen: dict[int, int] = {}
        for item in items:
            kind = type(item)
            if kind is str or kind is bytes or (kind is int and -_SMALL_HASH < item < _SMALL_HASH):
                continue
            self._count_hash(seen, item)
        self.left += _HASH_ENTRY * len(seen)

    def _count_hash(self, seen: dict[int, int], key: Any) -> None:
        try:
            h = hash(key)
        except TypeError as exc:
            raise CodecError(str(exc)) from None
        same = seen.get(h, 0) + 1
        if same > MAX_SAME_HASH:
            raise CodecError(f"more than {MAX_SAME_HASH} keys of one dict or set share a hash value")
        if same == 1:
            self.charge(_HASH_ENTRY)
        seen[h] = same

    def _dict(self, depth: int) -> dict[Any, Any]:
        if depth >= MAX_DEPTH:
            raise CodecError(f"value nested deeper than {MAX_DEPTH}")
        self._tick()
        self.charge(_DICT_EMPTY)
        result: dict[Any, Any] = {}
        seen: dict[int, int] = {}
        data, end = self.data, self.end
        entries = 0
        charged = _DICT_EMPTY
        while True:
            if self.pos >= end:
                raise CodecError("truncated dict")
            if data[self.pos] == 0x30:  # '0' ends a dict
                self.pos += 1
                break
            key = self.value(depth + 1)
            kind = type(key)
            if kind is str:
                if 1 < len(key) <= _KEY_CHARS:
                    known = self.keys.get(key)
                    if known is not None:
                        self.left += sys.getsizeof(key)  # this copy goes: the known one is used
                        key = known
                    elif len(self.keys) < _KEYS:
                        self.charge(_HASH_ENTRY)
                        self.keys[key] = key
            elif not (kind is bytes or (kind is int and -_SMALL_HASH < key < _SMALL_HASH)):
                self._count_hash(seen, key)
            value = self.value(depth + 1)
            grow = _DICT_ENTRY + (_DICT_FIRST if not entries else 0)
            self.charge(grow)
            charged += grow
            result[key] = value
            entries += 1
            if len(result) != entries:
                raise CodecError("duplicate dict key")
            if entries % _CHECK_EVERY == 0:
                self.clock()
        self.left += charged + _HASH_ENTRY * len(seen) - sys.getsizeof(result)
        return result

    def _items(self, n: int, depth: int) -> list[Any]:
        """The n values of a list, tuple or set, into an exact-size list (already charged)."""
        items: list[Any] = [None] * n
        data, end = self.data, self.end
        j = 0
        mark = _CHECK_EVERY
        plain = 0  # no run is looked for before this index
        miss = 1  # after a failed look, skip this many items before the next (doubling up to 32):
        # irregular data pays for few looks, and a run is found at most 32 items late
        while j < n:
            if j >= mark:
                self.clock()
                mark = j + _CHECK_EVERY
            pos = self.pos
            if pos >= end:
                raise CodecError("truncated value")
            code = data[pos]
            if code in (78, 84, 70):  # N T F: one byte each, a run of them is found by one C call
                k = self._run_length(pos, 1, ((0, b"NTF"),), n - j)
                if data.count(b"N", pos, pos + k) != k:  # items start as None
                    self._run_ones(items, j, k)
                self.pos = pos + k
                j += k
                continue
            if j >= plain and n - j >= _MIN_RUN:
                shapes = _RUNS.get(code)
                if shapes is not None:
                    longest = 0
                    for head, stride, planes, convert in shapes:
                        # cheap looks first: the item's fixed bytes, and the code of the next item
                        if not data.startswith(head, pos) or data[pos + stride:pos + stride + 1] != head[:1]:
                            continue
                        k = self._run_length(pos, stride, planes, n - j)
                        if k >= _MIN_RUN:
                            convert(self, items, j, k, stride)
                            self.pos = pos + stride * k
                            j += k
                            miss = 1
                            break
                        if k > longest:
                            longest = k
                    else:
                        if code == 117:
                            k = self._run_texts(items, j, n - j)
                        elif code == 40 or code == 91:
                            k = self._run_rows(items, j, n - j, depth)
                        else:
                            k = 0
                        if k:
                            j += k
                            miss = 1
                        else:
                            plain = j + (longest if longest > miss else miss)
                            miss = miss * 2 if miss < 32 else 32
                    if j >= plain:
                        continue
            items[j] = self.value(depth)
            j += 1
        return items

    def _run_length(self, pos: int, stride: int, planes: tuple[tuple[int, bytes], ...], limit: int) -> int:
        """How many items from ``pos`` on (at most ``limit``) have, at each (offset, allowed) of
        ``planes``, a byte from ``allowed``: strided slices and lstrip, in windows that grow from 8
        to _CHUNK items so that the work is proportional to the run found."""
        data = self.data
        limit = min(limit, (self.end - pos) // stride)
        k = 0
        window = _MIN_RUN
        while k < limit:
            w = min(window, limit - k)
            start = pos + k * stride
            stop = start + w * stride
            run = w
            for offset, allowed in planes:
                plane = data[start + offset:stop:stride]
                run = min(run, len(plane) - len(plane.lstrip(allowed)))
            k += run
            if run < w:
                break
            window = min(window * 8, _CHUNK)
        return k

    def _run_ones(self, items: list[Any], j: int, k: int) -> None:
        """A run of one-byte items (None, True, False) at self.pos."""
        pos = self.pos
        for a in range(0, k, _CHUNK):
            part = self.data[pos + a:pos + min(a + _CHUNK, k)]
            temporary = len(part) + _LIST + _PTR * len(part)
            self.charge(temporary)
            items[j + a:j + a + len(part)] = list(map(_ONE_BYTE.__getitem__, part))
            self.left += temporary

    def _run_numbers(self, items: list[Any], j: int, k: int, stride: int) -> None:
        """A run of 'i' (int32) or 'g' (float64) items: pick the payload bytes out with strided slices."""
        pos = self.pos
        kind = "i" if stride == 5 else "d"
        width = stride - 1
        for a in range(0, k, _CHUNK):
            c = min(_CHUNK, k - a)
            chunk = self.data[pos + stride * a:pos + stride * (a + c)]
            if kind == "i":
                # every int is charged as if not cached; two digits when |x| >= 2**30
                self.charge(c * (_INT_BASE + 4) + 4 * chunk[4::5].translate(_BIG_I32).count(1))
            else:
                self.charge(c * _FLOAT)
            # the chunk, the payload, the array, the list and one strided slice
            temporary = 3 * _BYTES + 64 + stride * c + 2 * width * c + c + _LIST + _PTR * c
            self.charge(temporary)
            payload = bytearray(width * c)
            for b in range(width):
                payload[b::width] = chunk[1 + b::stride]
            numbers = array.array(kind, payload)
            if not _NATIVE_LE:
                numbers.byteswap()
            if kind == "i":  # ints 0..255 are CPython's cached ones: charged above, they cost nothing
                self.left += (_INT_BASE + 4) * _bytes_ints(chunk, 1, stride, c)
            items[j + a:j + a + c] = numbers.tolist()
            self.left += temporary
            self.clock()

    def _run_longs(self, items: list[Any], j: int, k: int, stride: int, negative: bool) -> None:
        """A run of 'l' ints of 2 to 4 15-bit digits each (31 to 60 bits: timestamps, ids, hashes)."""
        pos = self.pos
        size = (stride - 5) // 2
        for a in range(0, k, _CHUNK):
            c = min(_CHUNK, k - a)
            chunk = self.data[pos + stride * a:pos + stride * (a + c)]
            payload = bytearray(2 * size * c)
            for b in range(2 * size):
                payload[b::2 * size] = chunk[5 + b::stride]
            if payload[1::2].translate(None, _LOW7):
                raise CodecError("bad int digit")
            digits = array.array("H", payload)
            if not _NATIVE_LE:
                digits.byteswap()
            top = digits[size - 1::size]
            if top.count(0):
                raise CodecError("bad int: unnormalized digits")
            # the ints (two 30-bit digits each), then the chunk, payload, digit arrays and lists alive meanwhile
            temporary = (stride + 4 * size + 25) * c + 512
            self.charge(c * (_INT_BASE + 8) + temporary)
            if size == 2:
                values = [lo | hi << 15 for lo, hi in zip(digits[0::2], top, strict=True)]
            elif size == 3:
                values = [lo | mid << 15 | hi << 30
                          for lo, mid, hi in zip(digits[0::3], digits[1::3], top, strict=True)]
            else:
                values = [d0 | d1 << 15 | d2 << 30 | d3 << 45
                          for d0, d1, d2, d3 in zip(digits[0::4], digits[1::4], digits[2::4], top, strict=True)]
            if negative:
                values = [-v for v in values]
            items[j + a:j + a + c] = values
            self.left += temporary + (4 * c if size == 2 else 0)  # up to 30 bits: one digit
            self.clock()

    def _run_rows(self, items: list[Any], j: int, left: int, depth: int) -> int:
        """A run of tuples or lists of 2 to 4 numbers laid out alike (points, pairs, edges): each
        column's payload is picked out with strided slices, and zip makes the rows."""
        data, pos, end = self.data, self.pos, self.end
        if depth >= MAX_DEPTH or pos + 5 > end:
            return 0
        code = data[pos]
        m = _I32.unpack_from(data, pos + 1)[0]
        if not 2 <= m <= 4:
            return 0
        columns: list[tuple[int, str]] = []  # (offset of the item's code, array kind)
        q = pos + 5
        for _ in range(m):
            if q >= end or data[q] not in (105, 103):
                return 0
            columns.append((q - pos, "i" if data[q] == 105 else "d"))
            q += 5 if data[q] == 105 else 9
        stride = q - pos
        planes = ((0, data[pos:pos + 1]), (1, data[pos + 1:pos + 2]), (2, _ZERO), (3, _ZERO), (4, _ZERO),
                  *((offset, data[pos + offset:pos + offset + 1]) for offset, _ in columns))
        k = self._run_length(pos, stride, planes, left)
        if k < _MIN_RUN:
            return 0
        row = (_TUPLE if code == 40 else _LIST) + _PTR * m
        step = _CHUNK // 4  # m columns are alive at once: a smaller chunk keeps the temporaries small
        for a in range(0, k, step):
            c = min(step, k - a)
            chunk = data[pos + stride * a:pos + stride * (a + c)]
            size = row * c
            for offset, kind in columns:
                if kind == "i":  # charged as if not cached; two digits when |x| >= 2**30
                    size += c * (_INT_BASE + 4) + 4 * chunk[offset + 4::stride].translate(_BIG_I32).count(1)
                else:
                    size += c * _FLOAT
            self.charge(size)
            # the chunk, each column's list, two columns' payload and array, a slice, the list of rows
            temporary = 512 + stride * c + m * (_LIST + _PTR * c) + 33 * c + _LIST + _PTR * c
            self.charge(temporary)
            values = []
            for offset, kind in columns:
                width = 4 if kind == "i" else 8
                payload = bytearray(width * c)
                for b in range(width):
                    payload[b::width] = chunk[offset + 1 + b::stride]
                numbers = array.array(kind, payload)
                if not _NATIVE_LE:
                    numbers.byteswap()
                if kind == "i":  # ints 0..255 are CPython's cached ones: charged above, they cost nothing
                    self.left += (_INT_BASE + 4) * _bytes_ints(chunk, offset + 1, stride, c)
                values.append(numbers.tolist())
            rows = zip(*values, strict=True)
            items[j + a:j + a + c] = list(rows) if code == 40 else list(map(list, rows))
            self.left += temporary
            self.clock()
        self.pos = pos + stride * k
        return k

    def _run_texts(self, items: list[Any], j: int, left: int) -> int:
        """A run of str items of any lengths below 128 bytes: one pass reads their lengths, one
        decode makes the text (when it is all ASCII), slices of it make the strings."""
        data, end = self.data, self.end
        pos = p = self.pos
        unpack = _I32.unpack_from
        starts: list[int] = []
        lengths: list[int] = []
        stop = min(left, _CHUNK)
        # the two lists (and the start offsets' ints) live until the run is converted: charged first
        temporary = 2 * _LIST + (2 * _PTR + _INT_BASE + 4) * stop
        self.charge(temporary)
        while len(starts) < stop and p + 5 <= end and data[p] == 117:
            n = unpack(data, p + 1)[0]
            if not 0 <= n < 128 or p + 5 + n > end:
                break
            starts.append(p + 5)
            lengths.append(n)
            p += 5 + n
        k = len(starts)
        if k < 2:
            self.left += temporary
            return 0
        # then the block, its text and the list of values
        more = 2 * (_ASCII + p - pos) + _LIST + _PTR * k
        self.charge(more)
        temporary += more
        block = data[pos:p]
        if block.isascii():
            self.charge(_ASCII * k + (p - pos) - 5 * k)  # each str: 49 bytes and its characters
            text = block.decode("ascii")
            values = [text[s - pos:s - pos + n] for s, n in zip(starts, lengths, strict=True)]
        else:
            bound = (72 + _PTR) * k + 4 * (p - pos)  # at most 4 bytes per character
            self.charge(bound)
            try:
                values = [data[s:s + n].decode("utf-8", "surrogatepass") for s, n in zip(starts, lengths, strict=True)]
            except UnicodeDecodeError as exc:
                raise CodecError(f"bad text: {exc}") from None
            self.left += bound - sum(map(sys.getsizeof, values))
        items[j:j + k] = values
        self.left += temporary
        self.pos = p
        self.clock()
        return k

    def _run_const(self, items: list[Any], j: int, k: int, const: tuple[Any, ...]) -> None:
        """A run of one shared immutable value ('' b'' ()): nothing to allocate but the slots."""
        temporary = _TUPLE + _PTR * _CHUNK
        self.charge(temporary)
        for a in range(0, k, _CHUNK):
            c = min(_CHUNK, k - a)
            items[j + a:j + a + c] = const if c == _CHUNK else const[:c]
        self.left += temporary

    def _run_chars(self, items: list[Any], j: int, k: int, stride: int) -> None:
        """A run of one-character ASCII strings (CPython caches them: nothing to allocate)."""
        pos = self.pos
        for a in range(0, k, _CHUNK):
            c = min(_CHUNK, k - a)
            start = pos + 6 * a + 5
            temporary = _BYTES + _ASCII + 2 * c + _LIST + _PTR * c
            self.charge(temporary)
            items[j + a:j + a + c] = list(self.data[start:start + 6 * c:6].decode("ascii"))
            self.left += temporary

    def _run_new(self, items: list[Any], j: int, k: int, factory: type[Any], size: int) -> None:
        """A run of empty lists or dicts: each a new object, charged before it is made."""
        for a in range(0, k, _CHUNK):
            c = min(_CHUNK, k - a)
            temporary = _LIST + _PTR * c
            self.charge(c * size + temporary)
            items[j + a:j + a + c] = [factory() for _ in range(c)]
            self.left += temporary
            self.clock()


_Convert = Callable[[_Parser, list[Any], int, int, int], None]


def _empty(code: bytes) -> tuple[bytes, int, tuple[tuple[int, bytes], ...]]:
    """An empty str, bytes, tuple or list: the code and a zero length."""
    return code + bytes(4), 5, ((0, code), (1, _ZERO), (2, _ZERO), (3, _ZERO), (4, _ZERO))


def _longs(negative: bool) -> _Convert:
    def convert(parser: _Parser, items: list[Any], j: int, k: int, stride: int) -> None:
        parser._run_longs(items, j, k, stride, negative)
    return convert


# code byte -> the runs it may start: (fixed first bytes, item size, per-offset allowed bytes, converter)
_RUNS: dict[int, tuple[tuple[bytes, int, tuple[tuple[int, bytes], ...], _Convert], ...]] = {
    ord("i"): ((b"i", 5, ((0, b"i"),), _Parser._run_numbers),),
    ord("g"): ((b"g", 9, ((0, b"g"),), _Parser._run_numbers),),
    ord("u"): (
        (*_empty(b"u"), lambda p, items, j, k, _: p._run_const(items, j, k, _EMPTY_STRS)),
        (b"u\x01\x00\x00\x00", 6, ((0, b"u"), (1, b"\x01"), (2, _ZERO), (3, _ZERO), (4, _ZERO), (5, _ASCII_BYTES)),
         _Parser._run_chars),
    ),
    ord("l"): tuple(
        (b"l" + _I32.pack(n), 5 + 2 * abs(n), ((0, b"l"), *((b, _I32.pack(n)[b - 1:b]) for b in range(1, 5))),
         _longs(n < 0))
        for n in (2, 3, 4, -2, -3, -4)),
    ord("s"): ((*_empty(b"s"), lambda p, items, j, k, _: p._run_const(items, j, k, _EMPTY_BYTES)),),
    ord("("): ((*_empty(b"("), lambda p, items, j, k, _: p._run_const(items, j, k, _EMPTY_TUPLES)),),
    ord("["): ((*_empty(b"["), lambda p, items, j, k, _: p._run_new(items, j, k, list, _LIST)),),
    ord("{"): ((b"{0", 2, ((0, b"{"), (1, b"0")),
                lambda p, items, j, k, _: p._run_new(items, j, k, dict, _DICT_EMPTY)),),
}
