#!/usr/bin/env bash
# System packages the test suite needs beyond Python wheels: Chromium, to render report.html headless.
# Quick when already installed; never fails the set-up: without root or apt it warns, and the tests
# that need Chromium skip with a reason.
set -euo pipefail

warn() { echo "setup-system: warning: $*" >&2; }

if command -v chromium >/dev/null 2>&1; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    warn "apt-get not found: install Chromium by hand; the report rendering test will skip"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    warn "not root: run 'sudo apt-get install chromium'; the report rendering test will skip"
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null; then
    echo "setup-system: installed $(chromium --version 2>/dev/null || echo chromium)"
else
    warn "apt-get could not install chromium; the report rendering test will skip"
fi
