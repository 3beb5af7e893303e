#!/usr/bin/env bash
# The main job:   sudo bash scripts/main.sh [pgtrace run options]
# Sets the machine up (scripts/setup.sh), checks it with `pgtrace doctor`, then runs
# `pgtrace run`: the built-in single-row insert driver (40 runners, 10 s by default)
# against a private throwaway PostgreSQL cluster, traced by pgtrace, and prints where
# every request's time went, end to end and inside the server.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
bash scripts/setup.sh
PGTRACE="$REPO_ROOT/.venv/bin/pgtrace"
"$PGTRACE" doctor
exec "$PGTRACE" run "$@"
