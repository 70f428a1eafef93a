#!/bin/sh
# Regenerates edgecompute_pb2.py and edgecompute_pb2.pyi from edgecompute.proto. Needs, in a venv of
# its own (they are not runtime dependencies): pip install grpcio-tools mypy-protobuf
# (generated with grpcio-tools 1.85.4 (protoc for protobuf 7.35.1) and mypy-protobuf 5.1.0).
# Run from anywhere: sh edgecompute/grpc_proto/generate.sh [path/to/venv/bin]
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
bin=${1:-$(dirname "$(command -v python3)")}
cd "$root"
PATH="$bin:$PATH" "$bin/python" -m grpc_tools.protoc -I. --python_out=. --mypy_out=. \
    edgecompute/grpc_proto/edgecompute.proto
for file in edgecompute_pb2.py edgecompute_pb2.pyi; do
    {
        echo "# Generated from edgecompute.proto by edgecompute/grpc_proto/generate.sh: do not edit;"
        echo "# edit the .proto and run: sh edgecompute/grpc_proto/generate.sh <venv with grpcio-tools, mypy-protobuf>/bin"
        cat "$here/$file"
    } > "$here/$file.tmp"
    mv "$here/$file.tmp" "$here/$file"
done
