#!/usr/bin/env bash
# The Slurm cluster tests (tests/cluster), when this machine can run them; otherwise one line
# saying why they were skipped and how to run them. Usage: scripts/cluster_tests.sh PYTHON [ARGS]
set -euo pipefail
cd "$(dirname "$0")/.."
py="$1"
shift
reason="$("$py" -c 'from tests.support.slurm_cluster import unavailable_reason as r; print(r() or "")')"
if [ -n "$reason" ]; then
    echo "Slurm cluster tests skipped: $reason. Run them with \`make test-cluster\` (as root)."
    exit 0
fi
exec "$py" -m pytest -q -m "not slow" tests/cluster "$@"
