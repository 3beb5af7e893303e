#!/usr/bin/env bash
# The whole test suite, as CI runs it:   sudo bash scripts/test.sh [--pg VERSIONS] [pytest args...]
#
# 1. scripts/setup.sh (packages, kernel headers, tracefs, .venv; seconds when already done)
# 2. the servers of the version matrix: PostgreSQL 15 from Debian (setup.sh), 17 and 18 built
#    by scripts/build-postgres.sh (reused when built before), and the prebuilt servers that
#    pgtrace must refuse (scripts/install-prebuilt-postgres.sh)
# 3. ruff check pgtrace tests scripts
# 4. mypy --strict pgtrace
# 5. pytest -v against each server of the matrix (root/BPF tests included; under CI=true they
#    may not be skipped; tests marked pg(...) for other versions are skipped, as they should)
#
# The matrix: --pg, else $PGTRACE_TEST_PG, else "15 18 17:accuracy": entries VERSION (the
# whole suite) or VERSION:accuracy (the engine accuracy and version tests only), separated
# by spaces or commas. Pytest args, when given, replace the selection on every version:
#   sudo bash scripts/test.sh --pg 18 tests/integration/test_doctor_live.py
# Every check runs even when an earlier one fails; the exit status is 0 only if all pass.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
PY="$REPO_ROOT/.venv/bin/python"
ACCURACY=(tests/integration/test_engine_accuracy.py tests/integration/test_versions.py)

MATRIX="${PGTRACE_TEST_PG:-15 18 17:accuracy}"
if [[ "${1:-}" == "--pg" ]]; then
    [[ $# -ge 2 ]] || { echo "test.sh: --pg needs a value, e.g. --pg 18 or --pg '15 17:accuracy'" >&2; exit 2; }
    MATRIX="$2"
    shift 2
fi
MATRIX="${MATRIX//,/ }"

bash scripts/setup.sh

failed=()
STEP_TIMES=()
step() {  # step <name> <command...>
    local name="$1" t0=$SECONDS rc=0
    shift
    echo "=== test: $name"
    "$@" || rc=$?
    STEP_TIMES+=("$name $((SECONDS - t0))s")
    if [[ $rc -eq 0 ]]; then
        echo "=== test: $name: ok ($((SECONDS - t0)) s)"
    else
        echo "=== test: $name: FAILED (exit $rc, $((SECONDS - t0)) s)"
        failed+=("$name")
    fi
    return 0
}

# --- the servers --------------------------------------------------------------------------
declare -A BIN=()
server_bin() {  # server_bin <major>: sets BIN[major] (Debian's package, else a build)
    local major="$1" out
    if [[ -x "/usr/lib/postgresql/$major/bin/postgres" ]]; then
        BIN[$major]="/usr/lib/postgresql/$major/bin"
        return 0
    fi
    out="$(bash scripts/build-postgres.sh "$major")" || return 1
    BIN[$major]="$(tail -n 1 <<<"$out")"
}
entries=()
for entry in $MATRIX; do
    major="${entry%%:*}"
    scope="full"
    [[ "$entry" == *:* ]] && scope="${entry#*:}"
    if [[ ! "$major" =~ ^[0-9]+$ || ! "$scope" =~ ^(full|accuracy)$ ]]; then
        echo "test.sh: bad matrix entry '$entry' (VERSION or VERSION:accuracy)" >&2
        exit 2
    fi
    entries+=("$major:$scope")
    if [[ -z "${BIN[$major]:-}" ]]; then
        step "server $major" server_bin "$major"
    fi
done
step "prebuilt servers to refuse" bash scripts/install-prebuilt-postgres.sh
bins=()
for major in $(printf '%s\n' "${!BIN[@]}" | sort -n); do
    bins+=("${BIN[$major]}")
done
export PGTRACE_TEST_PGBINS="${bins[*]}"  # every version of the matrix, for tests that use all

step "ruff" "$PY" -m ruff check pgtrace tests scripts
step "mypy" "$PY" -m mypy --strict pgtrace

# --- pytest on each version ---------------------------------------------------------------
LOGS="$(mktemp -d -t pgtrace-test.XXXXXX)"
trap 'rm -rf "$LOGS"' EXIT
for entry in "${entries[@]}"; do
    major="${entry%%:*}"
    scope="${entry#*:}"
    if [[ -z "${BIN[$major]:-}" ]]; then
        echo "=== test: pytest PostgreSQL $major: FAILED (no server, see 'server $major' above)"
        failed+=("pytest PostgreSQL $major")
        continue
    fi
    args=("$@")
    if [[ ${#args[@]} -eq 0 && "$scope" == accuracy ]]; then
        args=("${ACCURACY[@]}")
    fi
    log="$LOGS/pytest-$major-$scope.log"
    run_pytest() {
        "$PY" -m pytest -v "--pg-bin=${BIN[$major]}" "${args[@]}" 2>&1 | tee "$log"
        return "${PIPESTATUS[0]}"
    }
    step "pytest PostgreSQL $major ($scope, ${BIN[$major]})" run_pytest
done

# One closing line over the whole matrix (each pytest run printed its own above).
totals="$("$PY" - "$LOGS" <<'EOF'
import pathlib, re, sys
counts = {"passed": 0, "failed": 0, "skipped": 0, "error": 0}
for log in sorted(pathlib.Path(sys.argv[1]).glob("*.log")):
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if re.match(r"^=+ .* in [\d.]+s", ln)]
    if lines:
        for n, what in re.findall(r"(\d+) (passed|failed|skipped|errors?)", lines[-1]):
            counts["error" if what.startswith("error") else what] += int(n)
print(f"{counts['passed']} passed, {counts['failed'] + counts['error']} failed, "
      f"{counts['skipped']} skipped")
EOF
)"
echo "=== test: step times: $(IFS=';'; echo "${STEP_TIMES[*]}")"
if [[ ${#failed[@]} -gt 0 ]]; then
    echo "=== test: FAILED: ${failed[*]}"
    echo "matrix: $totals"
    exit 1
fi
echo "=== test: all passed"
echo "matrix: $totals"
