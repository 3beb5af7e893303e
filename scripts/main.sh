#!/usr/bin/env bash
# The main job:   sudo bash scripts/main.sh [--seconds N] [--clients 1,40]
# Sets the machine up (scripts/setup.sh), then profiles single-row inserts on a
# private throwaway PostgreSQL cluster with pgtrace and prints the attribution.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
bash scripts/setup.sh
exec "$REPO_ROOT/.venv/bin/python" scripts/demo.py "$@"
