#!/usr/bin/env bash
# Install HAProxy (Debian, as root) for direct ingress behind HAProxy (SERVE_ENABLE_HA_PROXY=1)
# and its tests, with its service kept from auto-starting: the controller starts its own.
set -euo pipefail
if command -v haproxy >/dev/null; then
    exit 0
fi
"$(dirname "$0")/apt_install.sh" haproxy
echo "install_haproxy.sh: $(haproxy -v | head -1) installed"
