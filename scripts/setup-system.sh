#!/usr/bin/env bash
# System packages the test suite needs beyond Python wheels (none yet).
set -euo pipefail
