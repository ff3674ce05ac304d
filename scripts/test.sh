#!/usr/bin/env bash
# The project's test command (README and CI run exactly this): install, lint, then the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/ensure-redis.sh
VENV="${VLS_VENV:-.venv}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLS_TEST_REDIS_URL="${VLS_TEST_REDIS_URL:-redis://127.0.0.1:6379/15}"
"$VENV/bin/python" -m ruff check .
"$VENV/bin/python" -m pytest "$@"
