#!/usr/bin/env bash
# Install (first run only) and start the service on the embedded defaults: CPU, FAISS on disk under ./data,
# in-process cache (set VLS_REDIS_URL to share one), official weights from weights/manifest.json, else demo
# weights, else random initialisation. Extra arguments go to uvicorn.
set -euo pipefail
cd "$(dirname "$0")/.."
VLS_EXTRAS="${VLS_EXTRAS:-}" bash scripts/setup.sh
VENV="${VLS_VENV:-.venv}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$VENV/bin/uvicorn" service.app:app --host "${VLS_HOST:-127.0.0.1}" --port "${VLS_PORT:-8000}" "$@"
