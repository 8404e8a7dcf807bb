#!/usr/bin/env bash
# Installs what is missing (Rust components, PostgreSQL 15) and runs the whole test suite:
# formatting, clippy, unit tests and the end-to-end tests against real PostgreSQL 15.
#
# Environment:
#   WALSHIP_TEST_THREADS   tests run at once (default 2)
#   WALSHIP_KEEP_TEST_DIRS keep every test's directory (logs, stores) for inspection
set -euo pipefail
cd "$(dirname "$0")/.."

PG_BIN=/usr/lib/postgresql/15/bin
say() { printf '==> %s\n' "$*"; }

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

if [ ! -x "$PG_BIN/initdb" ] || [ ! -x "$PG_BIN/pg_waldump" ] || [ ! -x "$PG_BIN/pgbench" ]; then
    say "installing PostgreSQL 15"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-15 postgresql-client-15 >/dev/null
fi
if ! command -v jq >/dev/null 2>&1; then
    # scripts/failover.sh reads 'wal-receiver status --json' with jq.
    say "installing jq"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq jq >/dev/null
fi
if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
    echo "the postgres OS user is missing; PostgreSQL refuses to run as root" >&2
    exit 1
fi
if ! command -v cargo >/dev/null 2>&1; then
    echo "cargo is missing: install Rust with rustup (https://rustup.rs)" >&2
    exit 1
fi
for component in rustfmt clippy; do
    if ! rustup component list --installed 2>/dev/null | grep -q "^$component"; then
        say "installing rust component $component"
        rustup component add "$component"
    fi
done

say "cargo fmt --check"
cargo fmt --all -- --check
say "cargo clippy"
cargo clippy --release --all-targets -- -D warnings
say "cargo build"
cargo build --release --all-targets
say "tests"
PROPTEST_CASES="${PROPTEST_CASES:-256}" RUST_BACKTRACE=0 cargo test --release --workspace -- --test-threads="${WALSHIP_TEST_THREADS:-2}"
