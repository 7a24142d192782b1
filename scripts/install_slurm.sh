#!/usr/bin/env bash
# Install the Slurm packages the cluster tests run (Debian/Ubuntu, as root), with their
# services kept from auto-starting: the tests start munged, slurmctld and slurmd themselves.
set -euo pipefail
if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
    && command -v munged >/dev/null; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "install_slurm.sh: run as root (apt-get install slurmctld slurmd slurm-client munge)" >&2
    exit 1
fi
policy=/usr/sbin/policy-rc.d
had_policy=0
[ -e "$policy" ] && had_policy=1
if [ "$had_policy" = 0 ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    trap 'rm -f "$policy"' EXIT
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge iproute2 >/dev/null
echo "install_slurm.sh: $(slurmctld -V) installed"
