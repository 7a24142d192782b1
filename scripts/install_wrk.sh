#!/bin/sh
# `make bench` load generator: wrk (Debian package). Installs it when missing and we are root
# with apt-get; otherwise says how, and the bench skips its HTTP rows. Never fails the build.
if command -v wrk >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "install_wrk: installing wrk with apt-get" >&2
    if DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null 2>&1 \
        || { apt-get update -qq >/dev/null 2>&1 \
             && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null 2>&1; }; then
        exit 0
    fi
    echo "install_wrk: apt-get could not install wrk" >&2
fi
echo "install_wrk: wrk is not installed; the HTTP ingress benchmarks will be skipped." >&2
echo "install_wrk: install it with: sudo apt-get install -y wrk" >&2
exit 0
