#!/usr/bin/env bash
# Create .venv (Python 3.10+) and install gemma3n with the given extras (default: dev).
# Skips the install when pyproject.toml and the extras are unchanged since the last one.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev}"
py="$(command -v python3.11 || command -v python3)"
[ -x .venv/bin/python ] || "$py" -m venv .venv
stamp="$(sha256sum pyproject.toml | cut -c1-16)-${extras}"
if [ "$(cat .venv/.gemma3n-installed 2>/dev/null)" != "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null
    .venv/bin/python -m pip install -q -e ".[${extras}]"
    echo "$stamp" > .venv/.gemma3n-installed
fi
# the native decode kernels: built once per machine and torch version (cached), else a fallback
.venv/bin/python -m gemma3n.kernels
