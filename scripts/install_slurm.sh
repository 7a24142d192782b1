#!/usr/bin/env bash
# Install the Slurm packages the cluster tests run (Debian/Ubuntu, as root), with their
# services kept from auto-starting: the tests start munged, slurmctld and slurmd themselves.
set -euo pipefail
if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
    && command -v munged >/dev/null; then
    exit 0
fi
"$(dirname "$0")/apt_install.sh" slurmctld slurmd slurm-client munge iproute2
echo "install_slurm.sh: $(slurmctld -V) installed"
