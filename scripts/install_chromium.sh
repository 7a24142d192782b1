#!/usr/bin/env bash
# Install Debian's Chromium and ChromeDriver for the dashboard's browser test (as root), with
# services kept from auto-starting. Does nothing when both are there.
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    exit 0
fi
"$(dirname "$0")/apt_install.sh" chromium chromium-driver fonts-dejavu-core
echo "install_chromium.sh: $(chromium --version 2>/dev/null), $(chromedriver --version 2>/dev/null)"
