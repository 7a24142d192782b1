#!/usr/bin/env bash
# Install Debian's Chromium and ChromeDriver for the dashboard's browser test (as root), with
# services kept from auto-starting. Does nothing when both are there.
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "install_chromium.sh: run as root (apt-get install chromium chromium-driver)" >&2
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
# Another apt-get may hold the lock (a shared machine): wait for it instead of failing.
apt_get() { apt-get -o DPkg::Lock::Timeout=600 "$@"; }
apt_get update -qq
apt_get install -y -qq --no-install-recommends chromium chromium-driver fonts-dejavu-core >/dev/null
echo "install_chromium.sh: $(chromium --version 2>/dev/null), $(chromedriver --version 2>/dev/null)"
