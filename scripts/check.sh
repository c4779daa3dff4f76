#!/usr/bin/env bash
# Static checks that hold the architecture (docs/architecture.md), run by .ci/run before the tests:
# import contracts, lint (no private members of other libraries), format, strict types, dependencies.
#   bash scripts/check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bin=.venv/bin

# The tools walk `agencyllm.*` as plain packages; the editable install maps them through an import
# hook they cannot follow, so give them a tree of links with the installed layout.
root=build/lint-root
rm -rf "$root" && mkdir -p "$root/agencyllm"
for top in serving auth quotas migrations; do ln -s "$PWD/$top" "$root/agencyllm/$top"; done

echo "== import contracts (lint-imports)"
PYTHONPATH="$root" "$bin/lint-imports" --no-cache
echo "== lint (ruff check)"
"$bin/ruff" check .
echo "== format (ruff format --check)"
"$bin/ruff" format --check .
echo "== types (mypy --strict: auth, quotas, serving.gateway)"
PYTHONPATH="" MYPYPATH="$root" "$bin/mypy" -p agencyllm.auth -p agencyllm.quotas -p agencyllm.serving.gateway
echo "== dependencies as imported (deptry)"
"$bin/deptry" .
