"""The worker protocol: frames round-trip any payload; large buffers cross through shared memory
and the segments are reused and removed."""

from __future__ import annotations

import os
import pickle
import socket
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edgecompute.placement.protocol import (
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
    remove_segments,
    shm_folder,
    unpack,
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


@pytest.fixture(scope="module")
def arena() -> Arena:
    arena = Arena(f"ec-{os.getpid()}-proto")
    yield arena
    arena.close()


@settings(max_examples=40, deadline=None)
@given(payload=payloads, copy=st.booleans())
def test_any_payload_round_trips(arena: Arena, payload: object, copy: bool) -> None:
    attachments = Attachments()
    frame, segment = encode("run", "t1", payload, arena)
    assert frame_length(frame[:4]) == len(frame) - 4
    kind, task, body, received = decode(frame[4:], attachments, copy=copy)
    assert (kind, task, received) == ("run", "t1", segment)
    assert same(payload, body)
    if segment is not None:
        arena.give_back(segment)
    del body
    attachments.close()


def test_large_buffers_go_through_shared_memory_and_segments_are_reused(arena: Arena) -> None:
    data = np.random.default_rng(1).random(1 << 20)  # 8 MB
    frame, segment = encode("done", "t", {"a": data, "b": data.tobytes()}, arena)
    assert segment is not None and len(frame) < 4096  # the data is not in the frame
    path = os.path.join(shm_folder(), segment)
    assert os.path.getsize(path) >= 2 * data.nbytes
    attachments = Attachments()
    _, _, body, _ = decode(frame[4:], attachments, copy=False)
    np.testing.assert_array_equal(body["a"], data)
    assert body["b"] == data.tobytes()
    arena.give_back(segment)
    _, again = encode("done", "t", data, arena)
    assert again == segment  # handed back, so taken again: no new pages to fault in
    _, other = encode("done", "t", data, arena)
    assert other != segment  # still lent: a second message gets its own
    del body
    attachments.close()


def test_small_payloads_stay_in_the_frame(arena: Arena) -> None:
    frame, segment = encode("run", "t", {"x": np.zeros(100), "b": b"abc"}, arena)
    assert segment is None
    assert len(frame) < OUT_OF_BAND


def test_a_body_this_side_cannot_read_comes_back_as_unreadable(arena: Arena) -> None:
    payload = pickle.dumps(("error", "t", b"\x80\x05cnowhere\nThing\n\x94.", None, []))
    kind, task, body, _ = decode(payload, Attachments(), copy=True)
    assert (kind, task) == ("error", "t") and isinstance(body, Unreadable)
    with pytest.raises(ProtocolError, match="not a frame"):
        decode(b"garbage", Attachments(), copy=True)
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        frame_length(HEADER.pack(2**31))


def test_remove_segments_clears_what_a_dead_process_left() -> None:
    prefix = f"ec-{os.getpid()}-dead"
    left = Arena(prefix)
    left.take(10)
    left.take(OUT_OF_BAND * 40)
    assert remove_segments(prefix) == 2
    assert not [n for n in os.listdir(shm_folder()) if n.startswith(prefix)]


@settings(max_examples=40, deadline=None)
@given(payload=payloads, copy=st.booleans(), kind=st.sampled_from(KINDS), task=st.integers(0, 2**64 - 1))
def test_compact_frames_round_trip_any_payload_in_one_packet(arena: Arena, payload: object, copy: bool, kind: str,
                                                             task: int) -> None:
    attachments = Attachments()
    frame = pack(kind, task, payload, arena)
    assert len(frame) < MAX_MESSAGE  # always one packet
    got_kind, got_task, body, segment = unpack(memoryview(frame), attachments, copy=copy)
    assert (got_kind, got_task) == (kind, task)
    assert same(payload, body)
    if segment is not None:
        arena.give_back(segment)
    del body
    attachments.close()


def test_a_small_message_is_a_header_and_one_pickle(arena: Arena) -> None:
    frame = pack("run", 7, ("apps/echo", 1, None), arena)
    assert len(frame) == 10 + len(pickle.dumps(("apps/echo", 1, None), 5))
    assert unpack(memoryview(frame), Attachments(), copy=True) == ("run", 7, ("apps/echo", 1, None), None)


def test_many_buffers_still_fit_one_packet(arena: Arena) -> None:
    arrays = [np.full(OUT_OF_BAND // 8, i, dtype=np.float64) for i in range(300)]  # 300 spans, 20 MB
    frame = pack("done", 1, arrays, arena)
    assert len(frame) < 300 * 40  # the span table is in the segment: the packet holds ~20 bytes an array
    attachments = Attachments()
    _, _, body, segment = unpack(memoryview(frame), attachments, copy=True)
    assert segment is not None and all((a == i).all() for i, a in enumerate(body))
    arena.give_back(segment)
    attachments.close()


def test_a_bad_compact_frame_is_a_protocol_error_and_an_unreadable_body_is_kept_apart() -> None:
    with pytest.raises(ProtocolError, match="not a frame"):
        unpack(memoryview(b"\xff" * 12), Attachments(), copy=True)
    with pytest.raises(ProtocolError, match="not a frame"):
        unpack(memoryview(b"\x00"), Attachments(), copy=True)
    with pytest.raises(ProtocolError, match="bad segment"):
        unpack(memoryview(b"\x03\x01" + bytes(8) + b"\x05nope!"), Attachments(), copy=True)
    frame = b"\x04\x00" + (9).to_bytes(8, "big") + b"\x80\x05cnowhere\nThing\n\x94."
    kind, task, body, _ = unpack(memoryview(frame), Attachments(), copy=True)
    assert (kind, task) == ("error", 9) and isinstance(body, Unreadable)


def test_threads_share_one_seqpacket_socket_without_a_lock(arena: Arena) -> None:
    """Four threads send and four receive at once: every message arrives whole, exactly once."""
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    received: list[tuple[int, object]] = []
    lock = threading.Lock()

    def send(start: int) -> None:
        for task in range(start, start + 250):
            left.sendall(pack("chunk", task, [task] * (task % 50), arena))

    def receive() -> None:
        buffer = bytearray(MAX_MESSAGE)
        while True:
            size = right.recv_into(buffer)
            if size == 0:
                return
            _, task, body, _ = unpack(memoryview(buffer)[:size], Attachments(), copy=True)
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
    assert sorted(received, key=lambda item: item[0]) == [(task, [task] * (task % 50)) for task in range(1000)]
