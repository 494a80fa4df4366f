#!/usr/bin/env bash
# Install Debian's headless-capable chromium for tests/test_report.py (renders report.html, checks its images).
# Idempotent: does nothing when /usr/bin/chromium is already there. Needs root (or sudo) and the Debian mirror.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
    echo "chromium already installed: $(/usr/bin/chromium --version 2>/dev/null || echo /usr/bin/chromium)"
    exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
    SUDO="sudo -n"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update
$SUDO apt-get install -y --no-install-recommends chromium fonts-dejavu-core
/usr/bin/chromium --version || true
