#!/usr/bin/env bash
# Installs what is missing (Rust components, PostgreSQL 15 from Debian, 16 to 18 with
# scripts/install-pg.sh) and runs the whole test suite: formatting, clippy, unit tests and the
# end-to-end tests against real PostgreSQL 15, then the end-to-end tests of every feature
# area (tests/tests/versions.rs) against 16, 17 and 18.
#
# Environment:
#   WALSHIP_TEST_THREADS   tests run at once (default 2)
#   WALSHIP_KEEP_TEST_DIRS keep every test's directory (logs, stores) for inspection
#   WALSHIP_PG_MAJORS      the majors besides 15 to run tests/tests/versions.rs on: some
#                          of 16, 17 and 18 (default all three)
#   WALSHIP_SKIP_PROMETHEUS=1  (for cargo test run by hand on a machine without Debian's
#                          prometheus package) skip the tests that need prometheus and
#                          promtool instead of failing; this script installs them
set -euo pipefail
cd "$(dirname "$0")/.."

PG_BIN=/usr/lib/postgresql/15/bin
read -r -a MAJORS <<<"${WALSHIP_PG_MAJORS:-16 17 18}"
say() { printf '==> %s\n' "$*"; }

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

if [ ! -x "$PG_BIN/initdb" ] || [ ! -x "$PG_BIN/pg_waldump" ] || [ ! -x "$PG_BIN/pgbench" ]; then
    say "installing PostgreSQL 15"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-15 postgresql-client-15 >/dev/null
fi
say "PostgreSQL ${MAJORS[*]} (scripts/install-pg.sh)"
PG_BINS=$(bash scripts/install-pg.sh "${MAJORS[@]}")  # fails the run here if the install fails
eval "$PG_BINS"
if ! command -v jq >/dev/null 2>&1; then
    # scripts/failover.sh reads 'wal-receiver status --json' with jq.
    say "installing jq"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq jq >/dev/null
fi
if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
    # tests/tests/metrics.rs runs a Prometheus server of its own, and promtool. Debian's
    # package would start and enable its own service: a policy-rc.d that says no (exit 101)
    # keeps the installation from starting it, and it is disabled where systemd runs.
    say "installing prometheus (its service is not started)"
    policy=/usr/sbin/policy-rc.d
    ours=""
    if [ ! -e "$policy" ]; then
        as_root sh -c "printf '#!/bin/sh\\nexit 101\\n' > $policy && chmod 755 $policy"
        ours=1
    fi
    rc=0
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null || rc=$?
    if [ -n "$ours" ]; then as_root rm -f "$policy"; fi
    if [ -d /run/systemd/system ]; then
        as_root systemctl disable prometheus.service >/dev/null 2>&1 || true
    fi
    [ "$rc" = 0 ] || exit "$rc"
fi
if ! command -v systemd-analyze >/dev/null 2>&1; then
    # tests/tests/service.rs checks the shipped units with 'systemd-analyze verify'.
    say "installing systemd (systemd-analyze)"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null
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
# The programs of PostgreSQL $1 (15 is Debian's).
pg_bin() { if [ "$1" = 15 ]; then echo "$PG_BIN"; else local v="PG$1_BIN"; echo "${!v}"; fi; }
pg_version() { "$(pg_bin "$1")/postgres" --version | awk '{print $3}'; }
# tests/tests/versions.rs also checks that a store refuses a primary of another major: the
# next one in the matrix (the last one's is 15).
ALL=(15 "${MAJORS[@]}")
other_major() {
    local i
    for i in "${!ALL[@]}"; do
        if [ "${ALL[i]}" = "$1" ]; then echo "${ALL[(i + 1) % ${#ALL[@]}]}"; return; fi
    done
}

say "tests, on PostgreSQL $(pg_version 15)"
PROPTEST_CASES="${PROPTEST_CASES:-256}" RUST_BACKTRACE=0 WALSHIP_PG_OTHER_BIN="$(pg_bin "$(other_major 15)")" \
    cargo test --release --workspace -- --test-threads="${WALSHIP_TEST_THREADS:-2}" --show-output
# --workspace, though only walship-tests has this test: the same features as the build above,
# so nothing is compiled again.
for major in "${MAJORS[@]}"; do
    say "tests/tests/versions.rs, on PostgreSQL $(pg_version "$major")"
    RUST_BACKTRACE=0 WALSHIP_PG_BIN="$(pg_bin "$major")" WALSHIP_PG_OTHER_BIN="$(pg_bin "$(other_major "$major")")" \
        cargo test --release --workspace --test versions -- --test-threads="${WALSHIP_TEST_THREADS:-2}" --show-output
done
