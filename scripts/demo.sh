#!/usr/bin/env bash
# Set up (if needed) and generate text with the embedded default model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
.venv/bin/gemma3n generate --prompt "${1:-Who made the heaven and the earth?}" --max-tokens 48 --seed 0 --verbose
