#!/usr/bin/env bash
# Install a headless Chromium for the report's browser tests (pytest -m browser,
# tests/report/test_report_browser.py). Idempotent: does nothing when a Chromium or Chrome
# is already on PATH (GitHub's Ubuntu runners ship google-chrome). Without one the tests skip.
#
# Debian: the `chromium` package. Ubuntu: `chromium-browser` is a snap shim that does not run
# in containers; use Google Chrome there (or a Debian image).
set -euo pipefail

for b in chromium chromium-browser google-chrome google-chrome-stable; do
  if command -v "$b" >/dev/null 2>&1; then
    echo "install-chromium: $b already installed: $("$b" --version 2>/dev/null || true)"
    exit 0
  fi
done

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "install-chromium: need root or sudo" >&2; exit 1; }
  SUDO="sudo"
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-chromium: no apt-get here; install Chromium or Chrome with your package manager" >&2
  exit 1
fi

. /etc/os-release
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
if [ "${ID:-}" = "debian" ] || [ "${ID_LIKE:-}" = "debian" ]; then
  # fonts: the screenshot test wants real glyphs, not boxes
  $SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
else
  echo "install-chromium: on ${PRETTY_NAME:-this system} Chromium comes as a snap; installing Google Chrome instead" >&2
  $SUDO apt-get install -y -qq wget ca-certificates >/dev/null
  tmp="$(mktemp -d)"
  wget -q -O "$tmp/chrome.deb" https://dl.google.com/linux/direct/google-chrome-stable_current_amd64.deb
  $SUDO apt-get install -y -qq "$tmp/chrome.deb" >/dev/null
  rm -rf "$tmp"
fi

for b in chromium google-chrome; do
  if command -v "$b" >/dev/null 2>&1; then
    echo "install-chromium: installed $("$b" --version 2>/dev/null || echo "$b")"
    exit 0
  fi
done
echo "install-chromium: installation finished but no browser on PATH" >&2
exit 1
