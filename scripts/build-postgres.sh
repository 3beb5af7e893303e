#!/usr/bin/env bash
# Build a PostgreSQL major version with USDT probes (--enable-dtrace), for tracing and tests.
#
#   sudo bash scripts/build-postgres.sh VERSION [--rebuild]      # VERSION: 17, 18, ...
#
# The source is Debian's source package for that major version (apt-get source
# postgresql-VERSION), from the Debian release that carries it (17: trixie, 18: forky).
# Only the upstream tree is built (Debian's patches are not applied), with
#   CFLAGS="-O2 -fno-omit-frame-pointer" ./configure --prefix=$PGTRACE_PG_ROOT/pgVERSION \
#       --enable-dtrace --with-icu --with-openssl [--with-liburing (18+)]
# plus pg_wait_sampling from the same release's binary package (the accuracy tests compare
# against it).
#
# The deb-src/deb lines live in a private apt directory ($PGTRACE_PG_ROOT/apt/<suite>: own
# sources.list, lists, cache); the machine's apt configuration, lists and cache are not
# touched. Build dependencies (bison, flex, systemtap-sdt-dev, ...) are installed with the
# machine's apt, like scripts/setup.sh does.
#
# Idempotent: when $PGTRACE_PG_ROOT/pgVERSION holds a finished build of that major version
# with the same options it is reused without touching the network (--rebuild builds the
# archive's current version again). The install is staged and moved into place at the end, so an interrupted build
# never leaves a half-installed prefix. The last line on stdout is the bin dir.
#
# Environment: PGTRACE_PG_ROOT (default /opt/pgtrace), PGTRACE_DEBIAN_MIRROR (default: the
# machine's Debian mirror from /etc/apt, else http://deb.debian.org/debian), PGTRACE_PG_SUITE
# (the Debian suite to take the source from), JOBS (make -j, default 2).
set -euo pipefail

export LC_ALL=C
export DEBIAN_FRONTEND=noninteractive

usage() {
    echo "usage: build-postgres.sh VERSION [--rebuild]   (VERSION: a major version, e.g. 17 or 18)" >&2
    exit 2
}

die() {  # die <message> [log file whose tail to show]
    echo "build-postgres: FAILED: $1" >&2
    if [[ $# -ge 2 && -s "$2" ]]; then
        echo "----- last lines of $2 -----" >&2
        tail -n 30 "$2" >&2
        echo "--------------------------------" >&2
    fi
    exit 1
}

say() {
    echo "build-postgres: $*" >&2
}

[[ $# -ge 1 ]] || usage
MAJOR="$1"
shift
REBUILD=0
for arg in "$@"; do
    case "$arg" in
        --rebuild) REBUILD=1 ;;
        *) usage ;;
    esac
done
[[ "$MAJOR" =~ ^[0-9]+$ ]] || die "VERSION must be a major version number such as 17, not '$MAJOR'"
if ((MAJOR < 13)); then
    die "PostgreSQL $MAJOR is not supported by pgtrace (13 or newer)"
fi

ROOT="${PGTRACE_PG_ROOT:-/opt/pgtrace}"
PREFIX="$ROOT/pg$MAJOR"
STAMP="$PREFIX/.pgtrace-build"
JOBS="${JOBS:-2}"

# How the server is built. Frame pointers as in Debian's packages: bcc walks user stacks
# by them (pgtrace attach --stacks). OpenSSL: the tests trace TLS sessions (ssl = on).
CONFIGURE=(--prefix="$PREFIX" --enable-dtrace --with-icu --with-openssl)
if ((MAJOR >= 18)); then
    CONFIGURE+=(--with-liburing)  # io_method = io_uring
fi
BUILD_CFLAGS="-O2 -fno-omit-frame-pointer"

# A finished build of this major version with these options: reuse it, no network, no root.
finished() {
    [[ -f "$STAMP" && -x "$PREFIX/bin/postgres" && -x "$PREFIX/bin/pgbench" ]] || return 1
    grep -qxF "configure=${CONFIGURE[*]}" "$STAMP" || return 1
    grep -qxF "cflags=$BUILD_CFLAGS" "$STAMP" || return 1
    "$PREFIX/bin/postgres" --version 2>/dev/null | grep -qE "\) $MAJOR(\.|beta|rc|devel)"
}

if [[ "$REBUILD" == 0 ]] && finished; then
    say "reusing $PREFIX ($("$PREFIX/bin/postgres" --version))"
    echo "$PREFIX/bin"
    exit 0
fi

[[ "$(id -u)" -eq 0 || -w "$ROOT" ]] || die "needs root to install into $ROOT (or set PGTRACE_PG_ROOT)"
command -v apt-get >/dev/null 2>&1 || die "needs apt-get (Debian/Ubuntu) to fetch the source package"

mkdir -p "$ROOT"
# One build per major version at a time (CI and a developer may both ask for it).
exec 9>"$ROOT/.pg$MAJOR.lock"
flock 9
if [[ "$REBUILD" == 0 ]] && finished; then  # built by whoever held the lock before us
    say "reusing $PREFIX ($("$PREFIX/bin/postgres" --version))"
    echo "$PREFIX/bin"
    exit 0
fi

START=$(date +%s)
WORK="$(mktemp -d -t "pgtrace-build-pg$MAJOR.XXXXXX")"
STAGE="$ROOT/.stage-pg$MAJOR"  # beside the prefix, so that the final move is a rename
rm -rf "$STAGE"
trap 'rm -rf "$WORK" "$STAGE"' EXIT

# --- build dependencies (machine apt, as scripts/setup.sh installs packages) -------------
DEPS=(bison flex systemtap-sdt-dev gcc make pkg-config dpkg-dev libreadline-dev zlib1g-dev
    libicu-dev libssl-dev liburing-dev)
missing=()
for p in "${DEPS[@]}"; do
    [[ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)" == "install ok installed" ]] \
        || missing+=("$p")
done
if [[ ${#missing[@]} -gt 0 ]]; then
    say "installing build dependencies: ${missing[*]}"
    APT_OPTS=(-q -y -o Dpkg::Use-Pty=0 -o DPkg::Lock::Timeout=600)
    { apt-get install "${APT_OPTS[@]}" --no-install-recommends "${missing[@]}" \
        || { apt-get update "${APT_OPTS[@]}" && apt-get install "${APT_OPTS[@]}" \
            --no-install-recommends "${missing[@]}"; }; } >"$WORK/deps.log" 2>&1 \
        || die "apt-get install ${missing[*]}" "$WORK/deps.log"
fi

# --- the source package, through a private apt directory ----------------------------------
if [[ -n "${PGTRACE_PG_SUITE:-}" ]]; then
    SUITE="$PGTRACE_PG_SUITE"
else
    case "$MAJOR" in
        13) SUITE=bullseye ;;
        15) SUITE=bookworm ;;
        17) SUITE=trixie ;;
        18) SUITE=forky ;;
        *) die "no Debian suite known to carry PostgreSQL $MAJOR: set PGTRACE_PG_SUITE" ;;
    esac
fi

debian_mirror() {
    # The Debian archive the machine already uses (deb822 or one-line sources), not security.
    local uri
    uri="$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources \
        2>/dev/null | grep -oE '(https?)://[^ ]+/debian/?( |$)' | grep -v security | head -n 1 \
        | tr -d ' ' || true)"
    echo "${uri:-http://deb.debian.org/debian}"
}
MIRROR="${PGTRACE_DEBIAN_MIRROR:-$(debian_mirror)}"
MIRROR="${MIRROR%/}"
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
[[ -r "$KEYRING" ]] || die "$KEYRING is missing (apt-get install debian-archive-keyring)"

APTDIR="$ROOT/apt/$SUITE"
mkdir -p "$APTDIR/etc/sources.list.d" "$APTDIR/etc/preferences.d" "$APTDIR/lists/partial" \
    "$APTDIR/cache/archives/partial"
{
    echo "deb-src [signed-by=$KEYRING] $MIRROR $SUITE main"
    echo "deb [signed-by=$KEYRING] $MIRROR $SUITE main"
} >"$APTDIR/etc/sources.list"
PAPT=(
    -q -o Dir::Etc::SourceList="$APTDIR/etc/sources.list"
    -o Dir::Etc::SourceParts="$APTDIR/etc/sources.list.d"
    -o Dir::Etc::PreferencesParts="$APTDIR/etc/preferences.d"
    -o Dir::State::Lists="$APTDIR/lists"
    -o Dir::Cache="$APTDIR/cache"
    -o Dir::Cache::pkgcache="" -o Dir::Cache::srcpkgcache=""
    -o APT::Sandbox::User=root
)
say "apt-get update (private: $APTDIR, deb-src $MIRROR $SUITE)"
apt-get "${PAPT[@]}" update >"$WORK/update.log" 2>&1 || die "apt-get update ($SUITE)" "$WORK/update.log"

# A mirror can list a point release whose files it does not have yet (or any more): then
# the previous point releases with the same Debian revision are tried, from the same pool
# directory. Their files are checked against their .dsc's SHA-256 sums; that .dsc is not in
# the signed index, which the message says.
earlier_release() {  # earlier_release <source package> <dir>: 0 if one was downloaded
    local pkg="$1" dir="$2" version directory upstream rev minor m cand dsc name sum
    rm -f "$dir"/*.dsc
    version="$(apt-cache "${PAPT[@]}" showsrc "$pkg" 2>/dev/null | sed -n 's/^Version: //p' | head -n 1)"
    directory="$(apt-cache "${PAPT[@]}" showsrc "$pkg" 2>/dev/null | sed -n 's/^Directory: //p' | head -n 1)"
    [[ "$version" =~ ^([0-9]+)\.([0-9]+)(-.*)$ ]] || return 1
    upstream="${BASH_REMATCH[1]}" minor="${BASH_REMATCH[2]}" rev="${BASH_REMATCH[3]}"
    for ((m = minor - 1; m >= 0 && m >= minor - 6; m--)); do
        cand="$upstream.$m$rev"
        dsc="${pkg}_$cand.dsc"
        /usr/lib/apt/apt-helper download-file "$MIRROR/$directory/$dsc" "$dir/$dsc" \
            >>"$WORK/source-$pkg.log" 2>&1 || continue
        while read -r sum _size name; do
            /usr/lib/apt/apt-helper download-file "$MIRROR/$directory/$name" "$dir/$name" \
                "SHA256:$sum" >>"$WORK/source-$pkg.log" 2>&1 || return 1
        done < <(sed -n '/^Checksums-Sha256:/,/^[^ ]/{/^ /p}' "$dir/$dsc")
        say "the mirror lists $pkg $version but lacks its files: took $cand from $directory" \
            "(files checked against its .dsc, which is not in the signed index)"
        return 0
    done
    return 1
}

fetch_source() {  # fetch_source <source package> <dir>: download and unpack, upstream only
    local pkg="$1" dir="$2"
    mkdir -p "$dir"
    (cd "$dir" && apt-get "${PAPT[@]}" source --download-only "$pkg") >"$WORK/source-$pkg.log" 2>&1 \
        || earlier_release "$pkg" "$dir" \
        || die "apt-get source $pkg ($SUITE), nor an earlier point release" "$WORK/source-$pkg.log"
    local dsc
    dsc="$(ls "$dir"/*.dsc | head -n 1)"
    # The upstream tree as released: Debian's patches (paths, socket dir) are not applied.
    (cd "$dir" && dpkg-source --no-check --skip-patches -x "$(basename "$dsc")" src) \
        >>"$WORK/source-$pkg.log" 2>&1 || die "dpkg-source -x $dsc" "$WORK/source-$pkg.log"
    basename "$dsc" .dsc
}

SRC_NAME="$(fetch_source "postgresql-$MAJOR" "$WORK/pg")"
SRC="$WORK/pg/src"
say "source: $SRC_NAME ($SUITE)"
# pg_wait_sampling (the accuracy tests compare LWLock shares with it): the same suite's
# binary package for this major version, fetched now so that a failure comes before the build.
WS_PKG="postgresql-$MAJOR-pg-wait-sampling"
mkdir -p "$WORK/ws"
(cd "$WORK/ws" && apt-get "${PAPT[@]}" download "$WS_PKG") >"$WORK/ws.log" 2>&1 \
    || die "apt-get download $WS_PKG ($SUITE)" "$WORK/ws.log"
WS_DEB="$(ls "$WORK"/ws/*.deb | head -n 1)"
dpkg-deb -x "$WS_DEB" "$WORK/ws/x" >>"$WORK/ws.log" 2>&1 || die "dpkg-deb -x $WS_DEB" "$WORK/ws.log"

# --- configure, build, install into a staging dir -----------------------------------------
say "configure ${CONFIGURE[*]} (CFLAGS=$BUILD_CFLAGS)"
(cd "$SRC" && CFLAGS="$BUILD_CFLAGS" ./configure "${CONFIGURE[@]}") >"$WORK/configure.log" 2>&1 \
    || die "configure" "$WORK/configure.log"
say "make -j$JOBS"
make -C "$SRC" -j"$JOBS" >"$WORK/make.log" 2>&1 || die "make" "$WORK/make.log"
make -C "$SRC" install DESTDIR="$STAGE" >"$WORK/install.log" 2>&1 || die "make install" "$WORK/install.log"
# pg_stat_statements etc. are not needed by pgtrace; pgbench is in src/bin and installed above.

# pg_wait_sampling's library and extension files go where the staged server looks
# (pg_config is relocatable: run from the staging dir, it names the staging dir's paths).
STAGED_BIN="$STAGE$PREFIX/bin"
STAGED_PKGLIB="$("$STAGED_BIN/pg_config" --pkglibdir)"
STAGED_SHARE="$("$STAGED_BIN/pg_config" --sharedir)"
cp "$WORK/ws/x/usr/lib/postgresql/$MAJOR/lib/pg_wait_sampling.so" "$STAGED_PKGLIB/" \
    || die "$WS_DEB has no usr/lib/postgresql/$MAJOR/lib/pg_wait_sampling.so"
cp "$WORK"/ws/x/usr/share/postgresql/"$MAJOR"/extension/pg_wait_sampling* "$STAGED_SHARE/extension/" \
    || die "$WS_DEB has no extension files for PostgreSQL $MAJOR"
WS_NAME="$(basename "$WS_DEB" .deb)"
say "pg_wait_sampling: $WS_NAME"

# The probes must be there: count the stapsdt notes of the staged server.
NOTES="$(readelf -n "$STAGED_BIN/postgres" 2>/dev/null | grep -c 'NT_STAPSDT' || true)"
((NOTES > 0)) || die "the built postgres has no USDT probes (is systemtap-sdt-dev installed?)"

cat >"$STAGE$PREFIX/.pgtrace-build" <<EOF
source=$SRC_NAME
suite=$SUITE
mirror=$MIRROR
configure=${CONFIGURE[*]}
cflags=$BUILD_CFLAGS
pg_wait_sampling=$WS_NAME
probe_sites=$NOTES
built=$(date -u +%Y-%m-%dT%H:%M:%SZ)
EOF

rm -rf "$PREFIX.old"
[[ -e "$PREFIX" ]] && mv "$PREFIX" "$PREFIX.old"
mv "$STAGE$PREFIX" "$PREFIX"
rm -rf "$PREFIX.old"
finished || die "$PREFIX is not a usable build after install"

say "installed $("$PREFIX/bin/postgres" --version) into $PREFIX: $NOTES probe sites, $(($(date +%s) - START)) s"
echo "$PREFIX/bin"
