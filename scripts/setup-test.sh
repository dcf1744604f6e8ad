#!/usr/bin/env bash
# What the test suite needs beyond Python packages: Debian's Chromium, for the test that renders
# the bench report in a real headless browser. Where apt-get cannot run, say so and go on: that
# one test then reports itself skipped, with this reason.
set -uo pipefail
if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo -n"; fi
if command -v apt-get >/dev/null 2>&1 \
  && { $SUDO apt-get install -y -qq chromium >/dev/null 2>&1 \
       || { $SUDO apt-get update -qq >/dev/null 2>&1 && $SUDO apt-get install -y -qq chromium >/dev/null 2>&1; }; }; then
  echo "setup-test: installed $(chromium --version 2>/dev/null)"
else
  echo "setup-test: could not install Debian's chromium; the browser test will be skipped" >&2
fi
exit 0
