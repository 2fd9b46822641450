#!/usr/bin/env bash
# Install headless Chromium from Debian for the browser tests (~1 min, ~480 MB; needs root or sudo).
# Idempotent: does nothing when /usr/bin/chromium is already there.
set -euo pipefail

if [ -x /usr/bin/chromium ]; then
  echo "install_chromium: $(/usr/bin/chromium --version 2>/dev/null || echo chromium) already installed"
  exit 0
fi
SUDO=()
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null || { echo "install_chromium: need root or sudo to apt-get install chromium" >&2; exit 1; }
  SUDO=(sudo)
fi
${SUDO[@]+"${SUDO[@]}"} apt-get update
${SUDO[@]+"${SUDO[@]}"} env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium  # with recommends (fonts): the checked recipe
/usr/bin/chromium --version
