#!/bin/sh
# Make sure Debian's chromium is installed for the browser tests (tests/reporting).
#
# Installs it only when /usr/bin/chromium is missing, from Debian's packages and nothing
# else (no browser downloads of its own). Needs root (or sudo without a password); exits
# non-zero when chromium cannot be installed, and the browser tests then skip with a message.
set -eu

CHROMIUM=/usr/bin/chromium

if [ -x "$CHROMIUM" ]; then
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
else
    echo "ensure-chromium: $CHROMIUM is missing and installing it needs root" >&2
    exit 1
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-chromium: $CHROMIUM is missing and this system has no apt-get" >&2
    exit 1
fi

echo "ensure-chromium: installing Debian's chromium" >&2
export DEBIAN_FRONTEND=noninteractive
# The package lists of a fresh machine may be missing or stale: update first.
$SUDO apt-get -o DPkg::Lock::Timeout=300 update -qq >&2
$SUDO apt-get -o DPkg::Lock::Timeout=300 install -y --no-install-recommends chromium >&2

if [ ! -x "$CHROMIUM" ]; then
    echo "ensure-chromium: chromium was installed but $CHROMIUM is not there" >&2
    exit 1
fi
echo "ensure-chromium: $($CHROMIUM --version 2>/dev/null || echo chromium installed)" >&2
