"""The worker protocol: frames round-trip any payload; large buffers cross through shared memory
that has no name, read-only on the receiving side, and the segments are reused."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import pickle
import socket
import threading
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edgecompute.placement._protocol import (
    HEADER,
    INBAND_MAX,
    KINDS,
    MAX_MESSAGE,
    OUT_OF_BAND,
    Arena,
    Attachments,
    ProtocolError,
    Unreadable,
    decode,
    encode,
    frame_length,
    pack,
    unpack,
)
from edgecompute.placement._protocol import (
    receive as receive_packet,
)
from edgecompute.placement._protocol import (
    send as send_packet,
)

arrays = hnp.arrays(
    dtype=st.sampled_from([np.uint8, np.int32, np.float32, np.float64, np.complex64]),
    shape=hnp.array_shapes(max_dims=3, max_side=64),
)
big_arrays = st.builds(lambda n, dtype: np.arange(n).astype(dtype), st.integers(OUT_OF_BAND // 8, 3 * OUT_OF_BAND),
                       st.sampled_from([np.float64, np.int64, np.uint8]))
leaves = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
          | st.binary(max_size=64) | st.binary(min_size=OUT_OF_BAND, max_size=OUT_OF_BAND + 100)
          | arrays | big_arrays
          # in band, but too much of it for one packet: the pickle itself goes to shared memory
          | st.builds(lambda n: "é" * n, st.integers(INBAND_MAX // 2, INBAND_MAX)))
payloads = st.recursive(leaves, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


def same(a: object, b: object) -> bool:
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(same, a, b))
    return type(a) is type(b) and a == b


@pytest.fixture
def arena() -> Iterator[Arena]:
    """A sender's arena, facing one peer (a segment's descriptor goes to the peer once)."""
    arena = Arena()
    yield arena
    arena.close()


def delivered(packet: tuple[bytes, int | None]) -> tuple[memoryview, list[int]]:
    """A packet as the peer gets it: the frame, and a descriptor of its own for the segment."""
    frame, fd = packet
    return memoryview(frame), [] if fd is None else [os.dup(fd)]


@settings(max_examples=40, deadline=None)
@given(payload=payloads, copy=st.booleans(), kind=st.sampled_from(KINDS), task=st.integers(0, 2**64 - 1))
def test_compact_frames_round_trip_any_payload_in_one_packet(payload: object, copy: bool, kind: str,
                                                             task: int) -> None:
    arena = Arena()
    attachments = Attachments()
    packet = pack(kind, task, payload, arena)
    assert len(packet[0]) < MAX_MESSAGE  # always one packet
    got_kind, got_task, body, segment = unpack(*delivered(packet)[:1], attachments, copy=copy,
                                               fds=delivered(packet)[1] if packet[1] is not None else None)
    assert (got_kind, got_task) == (kind, task)
    assert same(payload, body)
    if segment is not None:
        arena.give_back(segment)
    del body
    attachments.close()
    arena.close()


def test_a_segment_goes_with_its_first_frame_only_and_is_reused(arena: Arena) -> None:
    attachments = Attachments()
    data = np.arange(OUT_OF_BAND, dtype=np.float64)
    first = pack("done", 1, data, arena)
    assert first[1] is not None  # the descriptor travels with the segment's first use
    _, _, body, segment = unpack(*delivered(first)[:1], attachments, copy=True, fds=delivered(first)[1])
    assert segment is not None and np.array_equal(body, data)
    arena.give_back(segment)
    again = pack("done", 2, data * 2, arena)
    assert again[1] is None  # the same segment, already mapped on the other side
    _, _, body, reused = unpack(memoryview(again[0]), attachments, copy=True, fds=[])
    assert reused == segment and np.array_equal(body, data * 2)
    attachments.close()


def test_an_answer_hands_back_the_segment_of_its_request_in_the_same_packet(arena: Arena) -> None:
    """The worker's answer carries the host's segment back (one wake-up of the host for both)."""
    theirs = Arena()
    lent = theirs.take(OUT_OF_BAND)
    for body in (7, np.arange(OUT_OF_BAND, dtype=np.float64)):  # in band, and with a segment of its own
        packet = pack("done", 3, body, arena, release=lent.id)
        frame, fds = delivered(packet)
        kind, task, got, segment = unpack(frame, Attachments(), copy=True, fds=fds, arena=theirs)
        assert (kind, task) == ("done", 3) and same(body, got)
        assert theirs.take(OUT_OF_BAND) is lent  # back in the free list: taken again
        if segment is not None:
            arena.give_back(segment)
    theirs.close()


def test_received_buffers_are_read_only_even_to_mprotect(arena: Arena) -> None:
    """What a worker gets it cannot write, not even through native code that changes the protection
    of the page: the segment is sealed against writable mappings other than its sender's."""
    attachments = Attachments()
    packet = pack("run", 1, np.zeros(OUT_OF_BAND, dtype=np.uint8), arena)
    frame, fds = delivered(packet)
    _, _, body, segment = unpack(frame, attachments, copy=False, fds=fds)
    assert not body.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        body[0] = 1
    libc = ctypes.CDLL(None, use_errno=True)
    page = mmap.PAGESIZE
    address = body.__array_interface__["data"][0] // page * page
    libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    assert libc.mprotect(address, page, mmap.PROT_READ | mmap.PROT_WRITE) == -1
    assert ctypes.get_errno() == errno.EACCES
    del body
    assert segment is not None
    arena.give_back(segment)
    attachments.close()


def test_segments_have_no_name_in_the_shared_memory_folder(arena: Arena) -> None:
    before = set(os.listdir("/dev/shm"))
    pack("done", 1, np.zeros(4 * OUT_OF_BAND), Arena())
    assert set(os.listdir("/dev/shm")) <= before


def test_the_handshake_frame_is_protocol_1_in_band() -> None:
    frame = encode("setup", "", {"executor": "x", "blob": b"b" * (2 * OUT_OF_BAND)})
    assert frame_length(frame[:4]) == len(frame) - 4
    kind, task, body = decode(frame[4:])
    assert (kind, task, body["executor"], len(body["blob"])) == ("setup", "", "x", 2 * OUT_OF_BAND)
    named = pickle.dumps(("hello", "", pickle.dumps({}), "ec-1-w-1", [(0, 10)]), 5)
    with pytest.raises(ProtocolError, match="by name"):
        decode(named)
    with pytest.raises(ProtocolError, match="not a frame"):
        decode(b"garbage")
    with pytest.raises(ProtocolError, match="exceeds"):
        frame_length(HEADER.pack(2**31))


def test_a_small_message_is_a_header_and_one_pickle(arena: Arena) -> None:
    frame, fd = pack("run", 7, ("apps/echo", 1, None), arena)
    assert fd is None and len(frame) == 10 + len(pickle.dumps(("apps/echo", 1, None), 5))
    assert unpack(memoryview(frame), Attachments(), copy=True) == ("run", 7, ("apps/echo", 1, None), None)


def test_descriptors_nobody_asked_for_are_closed(arena: Arena) -> None:
    frame, _ = pack("run", 7, 1, arena)
    stray = os.open(os.devnull, os.O_RDONLY)
    unpack(memoryview(frame), Attachments(), copy=True, fds=[stray])
    with pytest.raises(OSError):
        os.fstat(stray)


def test_many_buffers_still_fit_one_packet(arena: Arena) -> None:
    arrays = [np.full(OUT_OF_BAND // 8, i, dtype=np.float64) for i in range(300)]  # 300 spans, 20 MB
    packet = pack("done", 1, arrays, arena)
    assert len(packet[0]) < 300 * 40  # the span table is in the segment: the packet holds ~20 bytes an array
    attachments = Attachments()
    _, _, body, segment = unpack(*delivered(packet)[:1], attachments, copy=True, fds=delivered(packet)[1])
    assert segment is not None and all((a == i).all() for i, a in enumerate(body))
    arena.give_back(segment)
    attachments.close()


def test_a_bad_compact_frame_is_a_protocol_error_and_an_unreadable_body_is_kept_apart() -> None:
    with pytest.raises(ProtocolError, match="not a frame"):
        unpack(memoryview(b"\xff" * 12), Attachments(), copy=True)
    with pytest.raises(ProtocolError, match="not a frame"):
        unpack(memoryview(b"\x00"), Attachments(), copy=True)
    with pytest.raises(ProtocolError, match="never sent"):
        unpack(memoryview(b"\x03\x01" + bytes(8) + bytes(4)), Attachments(), copy=True)
    with pytest.raises(ProtocolError, match="no descriptor"):
        unpack(memoryview(b"\x03\x05" + bytes(8) + bytes(4)), Attachments(), copy=True)
    frame = b"\x04\x00" + (9).to_bytes(8, "big") + b"\x80\x05cnowhere\nThing\n\x94."
    kind, task, body, _ = unpack(memoryview(frame), Attachments(), copy=True)
    assert (kind, task) == ("error", 9) and isinstance(body, Unreadable)


def test_a_segment_larger_than_the_peer_may_hold_is_refused() -> None:
    packet = pack("done", 1, np.zeros(4 << 20, dtype=np.uint8), Arena())
    frame, fds = delivered(packet)
    with pytest.raises(ProtocolError, match="larger than the peer may hold"):
        unpack(frame, Attachments(max_size=1 << 20), copy=True, fds=fds)


def test_threads_share_one_seqpacket_socket_without_a_lock(arena: Arena) -> None:
    """Four threads send and four receive at once: every message arrives whole, exactly once."""
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    received: list[tuple[int, object]] = []
    lock = threading.Lock()
    attachments = Attachments()
    big = b"x" * OUT_OF_BAND  # every third message has a buffer in a segment, the first use of one its fd

    def send(start: int) -> None:
        for task in range(start, start + 250):
            send_packet(left, *pack("chunk", task, [task] * (task % 50) + [big] * (task % 3 == 0), arena))

    def receive() -> None:
        buffer = bytearray(MAX_MESSAGE)
        while True:
            size, fds = receive_packet(right, buffer)
            if size == 0:
                return
            _, task, body, segment = unpack(memoryview(buffer)[:size], attachments, copy=True, fds=fds)
            if segment is not None:
                arena.give_back(segment)
            with lock:
                received.append((task, body))

    receivers = [threading.Thread(target=receive) for _ in range(4)]
    senders = [threading.Thread(target=send, args=(start,)) for start in range(0, 1000, 250)]
    for thread in [*receivers, *senders]:
        thread.start()
    for thread in senders:
        thread.join()
    left.shutdown(socket.SHUT_WR)
    for thread in receivers:
        thread.join(10)
    left.close()
    right.close()
    assert sorted(received, key=lambda item: item[0]) == [
        (task, [task] * (task % 50) + [big] * (task % 3 == 0)) for task in range(1000)]
    attachments.close()


@pytest.mark.parametrize("copy", [True, False])
def test_numpy_values_of_every_kind_cross_as_themselves(arena: Arena, copy: bool) -> None:
    """Plain arrays cross as buffer, dtype string and shape; the others (non-contiguous, fields,
    objects, subclasses) through numpy's own reduction: each comes back equal, of its type."""
    x = np.arange(24, dtype=np.int32).reshape(2, 3, 4)
    payload = [np.float64(1.5) * np.ones(()), np.arange(5, dtype=">i4"), np.array([True, False]),
               np.array(["2026-12-06"], dtype="datetime64[s]"), np.zeros((0, 3), np.float32),
               np.arange(OUT_OF_BAND, dtype=np.uint8), x[:, ::2], np.asfortranarray(x),
               np.zeros(2, dtype=[("a", "<i4"), ("b", "<f8")]), np.array([1, "a"], dtype=object),
               np.arange(3).view(np.recarray)]
    attachments = Attachments()
    frame, fds = delivered(pack("done", 1, payload, arena))
    _, _, body, segment = unpack(frame, attachments, copy=copy, fds=fds)
    for sent, got in zip(payload, body, strict=True):
        assert type(got) is type(sent) and got.dtype == sent.dtype and got.shape == sent.shape
        assert sent.tolist() == got.tolist()
    if segment is not None:
        arena.give_back(segment)
    del body, got
    attachments.close()


@pytest.mark.parametrize("copy", [True, False])
def test_a_body_that_is_one_plain_array_crosses_without_pickle(arena: Arena, copy: bool) -> None:
    """The common answer, one plain array, crosses as dtype, shape and data (in band when small,
    a segment's one span when large): no pickle opcode in the frame, the array equal, of its dtype;
    read-only over a segment unless copied."""
    attachments = Attachments()
    for sent in (np.array(2.5), np.arange(6, dtype=">i2").reshape(2, 3), np.zeros((0, 4), np.uint8),
                 np.array([True, False]), np.arange(3, dtype=np.complex64),
                 np.arange(OUT_OF_BAND, dtype=np.float32).reshape(-1, 8)):
        frame, fds = delivered(pack("done", 4, sent, arena, release=9))
        assert b"\x80\x05" not in bytes(frame)  # pickle protocol 5's opening
        kind, task, got, segment = unpack(frame, attachments, copy=copy, fds=fds)
        assert (kind, task) == ("done", 4)
        assert type(got) is np.ndarray and got.dtype == sent.dtype and got.shape == sent.shape
        assert got.tobytes() == sent.tobytes()
        assert got.flags.writeable == (copy or segment is None)
        if segment is not None:
            del got
            arena.give_back(segment)
    attachments.close()


def test_a_frame_that_describes_no_plain_array_is_unreadable(arena: Arena) -> None:
    """A peer's array frame is checked: an object dtype, or a shape its data does not fill, is an
    Unreadable body (the task's failure), never an array over memory it does not cover."""
    head = b"\x03\x10" + (5).to_bytes(8, "big")
    for dtype, shape, data in ((b"|O", (2,), bytes(16)), (b"<f8", (4,), bytes(16)), (b"<f8", (1,), bytes(16)),
                               (b"<f8", (-1,), bytes(8)), (b"nonsense", (1,), bytes(8))):
        frame = head + bytes([len(dtype), len(shape)]) + dtype + b"".join(n.to_bytes(8, "big", signed=True)
                                                                          for n in shape) + data
        kind, task, body, segment = unpack(memoryview(frame), Attachments(), copy=True)
        assert (kind, task, segment) == ("done", 5, None) and isinstance(body, Unreadable), (dtype, shape)
