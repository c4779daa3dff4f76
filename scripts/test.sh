#!/usr/bin/env bash
# The whole check, as CI runs it: the static checks that hold the architecture (import contracts,
# ruff lint and format, strict types, declared dependencies: scripts/check.sh), then the test suite.
#   bash scripts/test.sh               # everything
#   bash scripts/test.sh tests/test_gateway.py -k stream    # arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/check.sh
status=0
.venv/bin/python -m pytest "$@" || status=$?
# pytest's 5 means no test ran: a selection that matches nothing is a failure, not a pass.
if [[ "$status" == 5 ]]; then
  echo "no tests ran" >&2
fi
exit "$status"
