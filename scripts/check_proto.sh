#!/usr/bin/env bash
# Regenerate the protobuf code into a scratch copy and fail if it differs from serve/_proto.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
mkdir -p "$scratch/serve/_proto"
cp -r "$root/proto" "$scratch/proto"
cd "$scratch"
eval "$PROTOC" proto/*.proto
cd "$root"
status=0
for f in "$scratch"/serve/_proto/*; do
  name=$(basename "$f")
  if ! cmp -s "$f" "serve/_proto/$name"; then
    echo "proto drift: serve/_proto/$name differs from what proto/ generates; run 'make proto'." >&2
    status=1
  fi
done
for f in serve/_proto/*_pb2*; do
  [ -e "$scratch/serve/_proto/$(basename "$f")" ] || { echo "proto drift: stale $f" >&2; status=1; }
done
exit $status
