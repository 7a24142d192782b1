#!/usr/bin/env bash
# apt_install.sh PACKAGE...: install Debian packages (as root) with their services kept from
# auto-starting (a policy-rc.d for the duration), waiting for another apt-get's lock.
set -euo pipefail
if [ "$(id -u)" != 0 ]; then
    echo "apt_install.sh: run as root (apt-get install $*)" >&2
    exit 1
fi
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    trap 'rm -f "$policy"' EXIT
fi
export DEBIAN_FRONTEND=noninteractive
apt-get -o DPkg::Lock::Timeout=600 update -qq
apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "$@" >/dev/null
