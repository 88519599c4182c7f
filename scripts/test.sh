#!/usr/bin/env bash
# Run the whole test suite: makes a venv in .venv, installs the project (not
# editable: the twistd plugin must be found exactly as users get it), runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q '.[test]'
exec .venv/bin/python -m pytest "$@"
