#!/usr/bin/env bash
# The whole test suite, as CI runs it:   sudo bash scripts/test.sh [pytest args...]
#
# 1. scripts/setup.sh (packages, kernel headers, tracefs, .venv; seconds when already done)
# 2. ruff check pgtrace tests scripts
# 3. mypy --strict pgtrace
# 4. pytest -v (root/BPF tests included; under CI=true they may not be skipped)
# Every check runs even when an earlier one fails; the exit status is 0 only if all pass.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
PY="$REPO_ROOT/.venv/bin/python"

bash scripts/setup.sh

failed=()
step() {  # step <name> <command...>
    local name="$1"
    shift
    echo "=== test: $name"
    if "$@"; then
        echo "=== test: $name: ok"
    else
        echo "=== test: $name: FAILED (exit $?)"
        failed+=("$name")
    fi
}

step "ruff" "$PY" -m ruff check pgtrace tests scripts
step "mypy" "$PY" -m mypy --strict pgtrace
step "pytest" "$PY" -m pytest -v "$@"

if [[ ${#failed[@]} -gt 0 ]]; then
    echo "=== test: FAILED: ${failed[*]}"
    exit 1
fi
echo "=== test: all passed"
