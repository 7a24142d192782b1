#!/usr/bin/env bash
# wrk (Debian package), the load generator of `make bench` and of the HAProxy tests under load.
# Installs it as root (scripts/apt_install.sh: apt-get update first, no service started);
# otherwise says how and fails (`make bench` goes on without its HTTP rows).
set -euo pipefail
if command -v wrk >/dev/null; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "install_wrk.sh: wrk is not installed; install it as root: sudo scripts/install_wrk.sh" >&2
    exit 1
fi
"$(dirname "$0")/apt_install.sh" wrk
echo "install_wrk.sh: $(command -v wrk) installed"
