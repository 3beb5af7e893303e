#!/usr/bin/env bash
# Prepare a Debian/Ubuntu machine to build, test and run pgtrace.
#
#   sudo bash scripts/setup.sh
#
# Idempotent: every step checks first and prints one line
# ("setup: <step>: ok|installed|linked|mounted|created|already done").
# A second run on a prepared machine takes a few seconds and touches nothing.
# PGTRACE_SETUP_QUIET=1 prints only problems.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
export LC_ALL=C

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO_ROOT/.venv"
STAMP="$VENV/.pgtrace-setup-stamp"
QUIET="${PGTRACE_SETUP_QUIET:-0}"
APT_UPDATED=0
WORK="$(mktemp -d -t pgtrace-setup.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT

say() {  # say <step> <result>
    if [[ "$QUIET" != 1 ]]; then
        echo "setup: $1: $2"
    fi
}

die() {  # die <step> <message> [log file whose tail to show]
    echo "setup: $1: FAILED: $2" >&2
    if [[ $# -ge 3 && -s "$3" ]]; then
        echo "----- last lines of output -----" >&2
        tail -n 30 "$3" >&2
        echo "--------------------------------" >&2
    fi
    exit 1
}

warn() {
    echo "setup: $1: WARNING: $2" >&2
}

if [[ "$(id -u)" -ne 0 ]]; then
    echo "setup: root required: run 'sudo bash scripts/setup.sh'" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg-query >/dev/null 2>&1; then
    echo "setup: this script supports Debian/Ubuntu (apt-get, dpkg) only" >&2
    exit 1
fi

APT_OPTS=(-q -y -o Dpkg::Use-Pty=0 -o DPkg::Lock::Timeout=600)

installed() {  # installed <pkg>: true when dpkg has it fully installed
    [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" == "install ok installed" ]]
}

apt_update_once() {
    if [[ "$APT_UPDATED" == 1 ]]; then
        return 0
    fi
    apt-get update "${APT_OPTS[@]}" >"$WORK/apt-update.log" 2>&1 \
        || die "apt-get update" "apt-get update failed" "$WORK/apt-update.log"
    APT_UPDATED=1
    say "apt-get update" "ok"
}

has_candidate() {  # has_candidate <pkg>: apt knows an installable version
    local cand
    cand="$(apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2; exit}' || true)"
    [[ -n "$cand" && "$cand" != "(none)" ]]
}

apt_install() {  # apt_install <step> <pkg>...: install what is missing, update lists at most once
    local step="$1"
    shift
    local missing=() p
    for p in "$@"; do
        installed "$p" || missing+=("$p")
    done
    if [[ ${#missing[@]} -eq 0 ]]; then
        say "$step" "already done"
        return 0
    fi
    # Refresh the lists when one of the packages is unknown or the lists may be stale.
    apt_update_once
    apt-get install "${APT_OPTS[@]}" --no-install-recommends "${missing[@]}" \
        >"$WORK/apt-install.log" 2>&1 \
        || die "$step" "apt-get install ${missing[*]} failed" "$WORK/apt-install.log"
    say "$step" "installed ${missing[*]}"
}

# --- PostgreSQL ---------------------------------------------------------------------------
PG_MAJOR=15
find_pg_major() {
    # The major version the 'postgresql' metapackage points to: installed, else candidate.
    local dep="" major
    if installed postgresql; then
        dep="$(dpkg-query -W -f='${Depends}' postgresql 2>/dev/null || true)"
    else
        if ! has_candidate postgresql; then
            apt_update_once
        fi
        dep="$(apt-cache depends postgresql 2>/dev/null | awk '/Depends:/ {print $2}' | tr '\n' ' ')"
    fi
    major="$(grep -oE 'postgresql-[0-9]+' <<<"$dep" | head -n 1 | cut -d- -f2 || true)"
    PG_MAJOR="${major:-15}"
}

find_pg_major
apt_install "postgresql $PG_MAJOR" \
    postgresql postgresql-contrib \
    "postgresql-$PG_MAJOR-pg-wait-sampling" "postgresql-$PG_MAJOR-pg-stat-kcache" libpq5
apt_install "bcc and build tools" \
    bpfcc-tools python3-bpfcc python3-venv systemtap-sdt-dev gcc linux-libc-dev
# HTML reports: PNG export (kaleido) and the browser test draw with Chromium;
# perf: the tests check that pgtrace leaves tracepoint events to other tracers
# vagrant: the tests run `vagrant validate` on vagrant/Vagrantfile
apt_install "chromium, perf and vagrant" chromium linux-perf vagrant

# --- kernel headers -----------------------------------------------------------------------
KREL="$(uname -r)"
MODDIR="/lib/modules/$KREL"

headers_ok() {  # bcc compiles against <modules>/build: it must hold a configured tree
    [[ -d "$MODDIR/build/include" && -e "$MODDIR/build/Makefile" ]]
}

kernel_headers() {
    local step="kernel headers"
    if headers_ok; then
        say "$step" "already done ($MODDIR/build -> $(readlink -f "$MODDIR/build"))"
        return 0
    fi
    # Prefer the headers of the running kernel when the archive has them.
    if ! installed "linux-headers-$KREL" && ! has_candidate "linux-headers-$KREL"; then
        apt_update_once
    fi
    if installed "linux-headers-$KREL" || has_candidate "linux-headers-$KREL"; then
        apt_install "$step" "linux-headers-$KREL"
        headers_ok || die "$step" "linux-headers-$KREL installed but $MODDIR/build is not usable"
        return 0
    fi

    # No package for this kernel (custom build): fall back to the distribution's generic
    # headers and point the running kernel's module dir at them.
    local arch meta
    arch="$(dpkg --print-architecture)"
    case "$arch" in
        amd64 | arm64) ;;
        *) die "$step" "no linux-headers-$KREL in apt and no fallback known for $arch" ;;
    esac
    if grep -qi '^ID=ubuntu' /etc/os-release 2>/dev/null; then
        meta="linux-headers-generic"
    else
        meta="linux-headers-$arch"
    fi
    apt_install "$step ($meta)" "$meta"

    # The metapackage depends on the versioned flavour package, e.g. linux-headers-6.1.0-56-amd64.
    local flavour build src cand
    flavour="$(dpkg-query -W -f='${Depends}' "$meta" | grep -oE 'linux-headers-[^ ,(]+' | head -n 1 || true)"
    [[ -n "$flavour" ]] || die "$step" "cannot tell which headers $meta depends on"
    build="/usr/src/$flavour"
    [[ -d "$build/include" ]] || die "$step" "$build is missing after installing $meta"
    src=""
    # Debian: <ver>-common; Ubuntu: <ver> without the flavour suffix.
    for cand in "/usr/src/${flavour%-*}-common" "/usr/src/${flavour%-*}"; do
        if [[ -d "$cand" ]]; then
            src="$cand"
            break
        fi
    done
    [[ -n "$src" ]] || die "$step" "cannot find the common headers tree for $flavour under /usr/src"

    mkdir -p "$MODDIR"
    ln -sfn "$build" "$MODDIR/build"
    ln -sfn "$src" "$MODDIR/source"
    headers_ok || die "$step" "$MODDIR/build -> $build is not a usable headers tree"
    say "$step" "linked (no linux-headers-$KREL in apt: $MODDIR/build -> $build, source -> $src)"
}
kernel_headers

# --- tracefs / debugfs --------------------------------------------------------------------
if mountpoint -q /sys/kernel/tracing 2>/dev/null; then
    say "tracefs" "already done"
elif mount -t tracefs nodev /sys/kernel/tracing 2>"$WORK/mount.log"; then
    say "tracefs" "mounted at /sys/kernel/tracing"
else
    die "tracefs" "cannot mount tracefs at /sys/kernel/tracing" "$WORK/mount.log"
fi

if mountpoint -q /sys/kernel/debug 2>/dev/null; then
    say "debugfs" "already done"
elif mount -t debugfs none /sys/kernel/debug 2>"$WORK/mount.log"; then
    say "debugfs" "mounted at /sys/kernel/debug"
else
    # pgtrace itself only needs tracefs; some bcc tools still look under debugfs.
    warn "debugfs" "cannot mount debugfs at /sys/kernel/debug: $(cat "$WORK/mount.log")"
fi

# --- virtualenv ---------------------------------------------------------------------------
venv_ok() {
    [[ -x "$VENV/bin/python" ]] || return 1
    grep -qE '^include-system-site-packages *= *true' "$VENV/pyvenv.cfg" 2>/dev/null || return 1
    grep -qE '^home *= */usr/bin$' "$VENV/pyvenv.cfg" 2>/dev/null || return 1
    (cd / && "$VENV/bin/python" -c 'import sys, pip' >/dev/null 2>&1) || return 1
}

if venv_ok; then
    say "venv" "already done ($VENV)"
else
    [[ -x /usr/bin/python3 ]] || die "venv" "/usr/bin/python3 is missing"
    rm -rf "$VENV"
    /usr/bin/python3 -m venv --system-site-packages "$VENV" >"$WORK/venv.log" 2>&1 \
        || die "venv" "/usr/bin/python3 -m venv failed" "$WORK/venv.log"
    rm -f "$STAMP"
    say "venv" "created $VENV (/usr/bin/python3, system site packages)"
fi

# --- pgtrace into the venv ----------------------------------------------------------------
WANT_STAMP="$(sha256sum "$REPO_ROOT/pyproject.toml" | cut -d' ' -f1)"
pgtrace_importable() {
    # From / so that the checkout itself is not on sys.path: the venv must know pgtrace.
    (cd / && "$VENV/bin/python" -c 'import importlib.metadata as m, pgtrace; m.version("pgtrace")' \
        >/dev/null 2>&1)
}

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT_STAMP" ]] && pgtrace_importable; then
    say "pip install -e .[dev]" "already done"
else
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-input \
        -e "$REPO_ROOT[dev]" >"$WORK/pip.log" 2>&1 \
        || die "pip install -e .[dev]" "pip failed" "$WORK/pip.log"
    pgtrace_importable || die "pip install -e .[dev]" "pgtrace is still not importable" "$WORK/pip.log"
    echo "$WANT_STAMP" >"$STAMP"
    say "pip install -e .[dev]" "installed"
fi

# --- bcc ----------------------------------------------------------------------------------
if (cd / && "$VENV/bin/python" -c 'import bcc' >"$WORK/bcc.log" 2>&1); then
    say "import bcc" "ok"
else
    die "import bcc" "the venv cannot import bcc (python3-bpfcc for /usr/bin/python3)" "$WORK/bcc.log"
fi
