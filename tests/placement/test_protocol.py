"""The worker protocol: frames round-trip any payload; large buffers cross through shared memory
and the segments are reused and removed."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edgecompute.placement.protocol import (
    HEADER,
    OUT_OF_BAND,
    Arena,
    Attachments,
    ProtocolError,
    Unreadable,
    decode,
    encode,
    frame_length,
    remove_segments,
    shm_folder,
)

arrays = hnp.arrays(
    dtype=st.sampled_from([np.uint8, np.int32, np.float32, np.float64, np.complex64]),
    shape=hnp.array_shapes(max_dims=3, max_side=64),
)
big_arrays = st.builds(lambda n, dtype: np.arange(n).astype(dtype), st.integers(OUT_OF_BAND // 8, 3 * OUT_OF_BAND),
                       st.sampled_from([np.float64, np.int64, np.uint8]))
leaves = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
          | st.binary(max_size=64) | st.binary(min_size=OUT_OF_BAND, max_size=OUT_OF_BAND + 100)
          | arrays | big_arrays)
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
