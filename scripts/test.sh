#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite plus the linter.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
.venv/bin/ruff check gemma3n tests tools bench
.venv/bin/python -m pytest "$@"
