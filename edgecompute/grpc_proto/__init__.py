"""The gRPC contract shared by the server (:mod:`edgecompute.server.grpc`) and the client
(:mod:`edgecompute.grpc_client`): the generated messages, the method paths, the metadata keys, the
status code each problem type is answered with, and how a :class:`Value` holds a Python value.

Needs ``pip install "edgecompute[grpc]"`` (protobuf; grpcio for the server and the client). It lives
outside :mod:`edgecompute.server` so that a client-only install does not need the HTTP server's
dependencies. ``edgecompute.proto`` is the source of truth; ``edgecompute_pb2.py``/``.pyi`` are
generated from it by ``generate.sh`` (docs/grpc.md).
"""

from __future__ import annotations

import json
from typing import Any

from .. import wire
from ..errors import InvalidRequest
from . import edgecompute_pb2 as pb

__all__ = ["FRAME", "JSON", "METHODS", "PROBLEM_KEY", "REQUEST_ID_KEY", "RETRY_AFTER_KEY", "SERVICE",
           "STATUS_NAMES", "decode_value", "encode_value", "pb", "status_name_for"]

SERVICE = "edgecompute.v1.Tasks"
#: method name -> full path, as a channel calls it
METHODS = {name: f"/{SERVICE}/{name}" for name in ("Submit", "Get", "Cancel", "Stream", "Algorithms", "Executors")}
#: trailing metadata carrying the RFC 9457 problem body (JSON) of a refused call
PROBLEM_KEY = "edgecompute-problem-bin"
#: trailing metadata: whole seconds to wait before retrying (429 and 503 problems)
RETRY_AFTER_KEY = "retry-after"
#: request and trailing metadata: the request id, as the HTTP header X-Request-ID
REQUEST_ID_KEY = "x-request-id"
FRAME = pb.FRAME
JSON = pb.JSON

#: problem type (slug) -> the name of the gRPC status code it is answered with (docs/grpc.md).
#: Names, not grpc.StatusCode members, so this module needs protobuf only.
STATUS_NAMES: dict[str, str] = {
    "bad-request": "INVALID_ARGUMENT",
    "invalid-request": "INVALID_ARGUMENT",
    "unsupported-media-type": "INVALID_ARGUMENT",
    "not-acceptable": "INVALID_ARGUMENT",
    "unauthorized": "UNAUTHENTICATED",
    "forbidden": "PERMISSION_DENIED",
    "not-found": "NOT_FOUND",
    "unknown-algorithm": "NOT_FOUND",
    "result-evicted": "NOT_FOUND",
    "method-not-allowed": "UNIMPLEMENTED",
    "conflict": "FAILED_PRECONDITION",
    "infeasible": "FAILED_PRECONDITION",
    "payload-too-large": "RESOURCE_EXHAUSTED",
    "uri-too-long": "RESOURCE_EXHAUSTED",
    "headers-too-large": "RESOURCE_EXHAUSTED",
    "rate-limited": "RESOURCE_EXHAUSTED",
    "too-many-in-flight": "RESOURCE_EXHAUSTED",
    "request-timeout": "DEADLINE_EXCEEDED",
    "unavailable": "UNAVAILABLE",
    "internal": "INTERNAL",
}


def status_name_for(slug: str) -> str:
    """The gRPC status code name a problem of type ``slug`` is answered with."""
    return STATUS_NAMES.get(slug, "UNKNOWN")


def encode_value(value: Any, encoding: int = FRAME, *, max_depth: int = wire.MAX_DEPTH) -> pb.Value:
    """``value`` as a :class:`Value`: an edgecompute frame (raw buffers) or tagged JSON. Raises
    :class:`InvalidRequest` (too deep, a top-level tag) or ``TypeError``/``ValueError`` (a value
    the wire cannot carry)."""
    # wrapped in {"v": ...}: a frame's top level is an object, and the depth rule then counts
    # exactly as it does for the HTTP document's "inputs"/"outputs"
    if encoding == JSON:
        try:
            # the common case, plain JSON with no "$" keys, skips the tagging walk (C speed)
            text = json.dumps({"v": value}, separators=(",", ":"), allow_nan=False).encode()
            if b'"$' not in text and text.count(b"[") + text.count(b"{") <= max_depth:
                return pb.Value(json=text)
        except (TypeError, RecursionError):
            pass  # bytes or arrays inside (tagged below), or too deep (refused below, naming the limit)
        return pb.Value(json=json.dumps(wire.to_jsonable({"v": value}, max_depth=max_depth), separators=(",", ":"),
                                        allow_nan=False).encode())
    return pb.Value(frame=wire.encode_frame({"v": value}, max_depth=max_depth))


def decode_value(value: pb.Value, *, max_depth: int = wire.MAX_DEPTH) -> Any:
    """The Python value a :class:`Value` holds (an empty Value is None). Raises
    :class:`InvalidRequest` for a malformed or too deep one, ``ValueError`` for JSON that does not parse."""
    kind = value.WhichOneof("kind")
    if kind is None:
        return None
    document = (wire.decode_frame(value.frame, max_depth=max_depth) if kind == "frame"
                else wire.decode_json(value.json, max_depth))
    if not isinstance(document, dict) or set(document) != {"v"}:
        raise InvalidRequest('a Value must hold the object {"v": <value>} (see edgecompute.proto)')
    return document["v"]
