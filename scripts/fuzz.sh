#!/usr/bin/env bash
# A long fuzzing pass over everything walship reads from the network or from disk: the
# frame decoder, the handshake and protocol messages, the state-file parser, the names of
# the files in a WAL store, history files, --target-time and the snapshot path checks. These are the property tests that scripts/test.sh runs briefly
# (256 cases each), here with many more random cases.
#
# Environment:
#   FUZZ_CASES   cases per property (default 500000, a few minutes)
#   PROPTEST_RNG_SEED  fixes the seed, to replay a run
#
# A failure prints the smallest input that fails; proptest also saves it under
# */tests/properties.proptest-regressions, so that every later run tries it first.
set -euo pipefail
cd "$(dirname "$0")/.."
cases="${FUZZ_CASES:-500000}"
echo "==> fuzzing with $cases cases per property"
for pkg in walship-common wal-receiver; do
    PROPTEST_CASES="$cases" cargo test --release -p "$pkg" --test properties -- --test-threads=2
done
echo "==> fuzzing found nothing"
