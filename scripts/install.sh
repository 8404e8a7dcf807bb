#!/usr/bin/env bash
# Installs wal-sender and wal-receiver into a bin directory (default /usr/local/bin).
# Run it with --help for the flags.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "$0")" && pwd)
REPO=$(dirname "$SCRIPT_DIR")
BINARIES=(wal-sender wal-receiver)

usage() {
    cat <<EOF
Usage: $(basename "$0") [--bindir DIR] [--from DIR]

Builds walship (cargo build --release --bins) and installs wal-sender and wal-receiver
into DIR, mode 0755. Each binary is copied to a temporary name in DIR and renamed over the
old one, so a program running the old copy (a standby's restore_command, a follow) keeps
it, and the next one run gets the new copy whole.

Install before you bootstrap a standby or restore a server: 'wal-receiver bootstrap' and
'wal-receiver restore' write a restore_command that names the wal-receiver they were run
as, so run the installed one (DIR/wal-receiver), not the one in the build tree.

  --bindir DIR   where to install (default: /usr/local/bin); created if missing
  --from DIR     install the binaries already in DIR (e.g. target/release, built as
                 yourself) instead of building them
  -h, --help     show this help
EOF
}

die() { printf 'install.sh: %s\n' "$*" >&2; exit 1; }

BINDIR=/usr/local/bin FROM=""
need_value() { if [ $# -lt 2 ] || [ -z "$2" ]; then die "$1 needs a value (see --help)"; fi; }
while [ $# -gt 0 ]; do
    case $1 in
        --bindir) need_value "$@"; BINDIR=$2; shift 2 ;;
        --from) need_value "$@"; FROM=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done

if [ -z "$FROM" ]; then
    [ -f "$REPO/Cargo.toml" ] || die "$REPO is not a walship source tree: give --from DIR"
    if ! command -v cargo >/dev/null && [ -x "$HOME/.cargo/bin/cargo" ]; then PATH="$HOME/.cargo/bin:$PATH"; fi
    command -v cargo >/dev/null || die "cargo is missing: install Rust (https://rustup.rs), or build elsewhere and give --from DIR"
    (cd "$REPO" && cargo build --release --bins) || die "cargo build --release failed"
    FROM=$REPO/target/release
fi
for b in "${BINARIES[@]}"; do
    if [ ! -f "$FROM/$b" ] || [ ! -x "$FROM/$b" ]; then die "$FROM/$b is missing or not executable"; fi
done

if [ ! -d "$BINDIR" ]; then
    # Every directory made on the way can be searched by all: the standby's restore_command
    # runs wal-receiver as the postgres user.
    (umask 022 && mkdir -p "$BINDIR") || die "cannot create $BINDIR"
fi
BINDIR=$(cd "$BINDIR" && pwd -P)

# A temporary name in the same directory, so that the rename is atomic; removed if we fail.
TMPS=()
cleanup() { for t in "${TMPS[@]+"${TMPS[@]}"}"; do rm -f "$t"; done; }
trap cleanup EXIT
for b in "${BINARIES[@]}"; do
    tmp="$BINDIR/.$b.install.$$"
    TMPS+=("$tmp")
    install -m 0755 "$FROM/$b" "$tmp" || die "cannot write $tmp"
    mv -f "$tmp" "$BINDIR/$b" || die "cannot rename $tmp to $BINDIR/$b"
done
for b in "${BINARIES[@]}"; do
    printf 'installed %s (%s)\n' "$BINDIR/$b" "$("$BINDIR/$b" --version)"
done
case ":$PATH:" in
    *":$BINDIR:"*) ;;
    *) printf 'note: %s is not in PATH; the scripts find the binaries with --bin %s or WALSHIP_BIN_DIR=%s\n' "$BINDIR" "$BINDIR" "$BINDIR" ;;
esac
