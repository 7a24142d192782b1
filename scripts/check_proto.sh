#!/usr/bin/env bash
# Regenerate the protobuf code into a scratch copy and fail if it differs from serve/_proto.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
mkdir -p "$scratch/serve/_proto" "$scratch/serve/generated" "$scratch/tests/support" "$scratch/examples"
cp -r "$root/proto" "$scratch/proto"
cp -r "$root/tests/support/protos" "$scratch/tests/support/protos"
cp -r "$root/examples/protos" "$scratch/examples/protos"
cd "$scratch"
eval "$PROTOC" proto/*.proto
eval "$API_PROTOC" proto/api/*.proto
eval "$TEST_PROTOC" tests/support/protos/*.proto
eval "$EXAMPLE_PROTOC" examples/protos/*.proto
cd "$root"
status=0
for f in "$scratch"/serve/_proto/*; do
  name=$(basename "$f")
  if ! cmp -s "$f" "serve/_proto/$name"; then
    echo "proto drift: serve/_proto/$name differs from what proto/ generates; run 'make proto'." >&2
    status=1
  fi
done
for f in "$scratch"/serve/generated/*; do
  name=$(basename "$f")
  if ! cmp -s "$f" "serve/generated/$name"; then
    echo "proto drift: serve/generated/$name differs from what proto/api generates; run 'make proto'." >&2
    status=1
  fi
done
for f in "$scratch"/tests/support/*_pb2*.py* "$scratch"/examples/*_pb2*.py; do
  name=${f#"$scratch"/}
  if ! cmp -s "$f" "$name"; then
    echo "proto drift: $name differs from what its .proto generates; run 'make proto'." >&2
    status=1
  fi
done
for f in serve/_proto/*_pb2* serve/generated/*_pb2* tests/support/*_pb2*; do
  [ -e "$scratch/$f" ] || { echo "proto drift: stale $f" >&2; status=1; }
done
exit $status
