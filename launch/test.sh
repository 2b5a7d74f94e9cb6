#!/usr/bin/env bash
# The test command: on a machine with only Python it creates .venv, installs PyTorch (the
# pinned CPU build 2.13.0 when no torch is importable) and the project with its dev extra,
# then runs pytest. Extra arguments go to pytest (e.g. `-m "not slow"` for the quick subset).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
PY="${VENV:-.venv}/bin/python"

set +e
"$PY" -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "launch/test.sh: pytest collected no tests; that is a failure." >&2
    exit 1
fi
exit "$rc"
