#!/usr/bin/env bash
# Create (or reuse) the virtualenv and install the project's dependencies from pyproject.toml.
#   VLS_VENV   where the venv lives (default: .venv in the repository)
#   VLS_EXTRAS extras to install (default: dev)
# The venv is stamped with a hash of pyproject.toml, so a reused venv is refreshed when dependencies change.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VLS_VENV:-.venv}"
EXTRAS="${VLS_EXTRAS:-dev}"
PYTHON="${VLS_PYTHON:-python3}"
stamp_value="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
stamp_file="$VENV/.vls-stamp-${EXTRAS:-base}"

if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp_value" ]; then
    echo "setup: $VENV is up to date"
    exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
# Dependencies only (the code runs from the checkout), so one cached venv serves any clone.
"$VENV/bin/python" - "$EXTRAS" > "$VENV/requirements.txt" <<'PY'
import sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
wanted = [e for e in sys.argv[1].split(",") if e]
print("\n".join(project["dependencies"] + [d for e in wanted for d in project["optional-dependencies"][e]]))
PY
# torch and torchvision first, exactly pinned, so nothing resolves another build of them.
grep -E '^(torch|torchvision)==' "$VENV/requirements.txt" > "$VENV/torch.txt"
"$VENV/bin/python" -m pip install --quiet -r "$VENV/torch.txt"
"$VENV/bin/python" -m pip install --quiet -r "$VENV/requirements.txt" -c "$VENV/torch.txt"
echo "$stamp_value" > "$stamp_file"
echo "setup: installed into $VENV"
