#!/usr/bin/env bash
# Promotes the most up-to-date standby once the primary is declared dead, and starts a
# wal-sender there. The other receivers find the new primary by themselves (they list every
# candidate's sender with --sender). Run it with --help for the flags.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "$0")" && pwd)
REPO=$(dirname "$SCRIPT_DIR")

usage() {
    cat <<EOF
Usage: $(basename "$0") --candidate NAME --wal-dir DIR --pgdata DIR --standby CONNINFO
                        --listen HOST:PORT [--pg-conn CONNINFO] [--sender-arg ARG]...
                        [--candidate NAME ...]... [options]

Run it once the primary is declared dead (by an operator or a health check). It:
  1. asks every candidate's WAL store and standby for its state (wal-receiver status);
  2. picks the candidate whose store holds the most recent WAL (highest timeline, then
     highest flush position), as leader election by most recent data prescribes;
  3. waits until that standby has received and replayed everything its store holds;
  4. promotes it (pg_ctl promote);
  5. starts wal-sender there, so the other receivers find the new primary on their own.
It prints what it chose and why. It refuses, changing nothing, when no candidate can be
chosen safely: a candidate's state cannot be read, a standby is not in recovery, the
stores belong to different clusters, or the chosen standby does not catch up in time.

Per candidate (each --candidate starts a new one; the flags after it describe it):
  --candidate NAME            a name for messages (e.g. the receiver's name)
  --wal-dir DIR               the WAL store of the receiver that feeds this standby
  --pgdata DIR                the standby's data directory
  --standby CONNINFO          libpq connection string of the standby, e.g.
                              "host=/var/run/postgresql port=5433 user=postgres"
  --listen HOST:PORT          where the new wal-sender listens if this one is promoted
                              (list it in every receiver's --sender flags)
  --pg-conn CONNINFO          what that wal-sender connects with (default: --standby)
  --sender-arg ARG            an extra argument for that wal-sender (repeatable), e.g.
                              --sender-arg --tls-cert --sender-arg FILE

Options:
  --bin DIR                   where wal-receiver and wal-sender live (default:
                              \$WALSHIP_BIN_DIR, else the directory of 'command -v
                              wal-receiver', else $REPO/target/release)
  --pg-bin DIR                PostgreSQL binaries (default: /usr/lib/postgresql/N/bin, N
                              the major version in the chosen standby's PG_VERSION)
  --wait SECONDS              how long the chosen standby may take to catch up, and to
                              promote (default: 120)
  --allow-missing             choose among the candidates whose state can be read, even if
                              another one cannot be read (it might hold more recent WAL)
  --dry-run                   print the choice and stop before promoting
  -h, --help                  show this help

Files it creates next to the chosen candidate's WAL store:
  <wal-dir>.sender.log        log of the new wal-sender
  <wal-dir>.sender.pid        its process id

Exit status: 0 promoted (or --dry-run chose), 1 refused or failed, 2 bad usage.
EOF
}

say() { printf '==> %s\n' "$*"; }
refuse() { printf 'REFUSED: %s\n' "$*" >&2; exit 1; }
usage_error() { printf 'error: %s (see --help)\n' "$*" >&2; exit 2; }

NAMES=() WAL_DIRS=() PGDATAS=() STANDBYS=() LISTENS=() PG_CONNS=() SENDER_ARGS=()
BIN="${WALSHIP_BIN_DIR:-}" PG_BIN="" WAIT=120 ALLOW_MISSING=false DRY_RUN=false
n=-1
need_value() { if [ $# -lt 2 ] || [ -z "$2" ]; then usage_error "$1 needs a value"; fi; }
need_candidate() { [ "$n" -ge 0 ] || usage_error "$1 must follow a --candidate"; }
while [ $# -gt 0 ]; do
    case $1 in
        --candidate) need_value "$@"; n=$((n + 1)); NAMES[n]=$2; WAL_DIRS[n]=""; PGDATAS[n]=""
                     STANDBYS[n]=""; LISTENS[n]=""; PG_CONNS[n]=""; SENDER_ARGS[n]=""; shift 2 ;;
        --wal-dir) need_value "$@"; need_candidate "$1"; WAL_DIRS[n]=$2; shift 2 ;;
        --pgdata) need_value "$@"; need_candidate "$1"; PGDATAS[n]=$2; shift 2 ;;
        --standby) need_value "$@"; need_candidate "$1"; STANDBYS[n]=$2; shift 2 ;;
        --listen) need_value "$@"; need_candidate "$1"; LISTENS[n]=$2; shift 2 ;;
        --pg-conn) need_value "$@"; need_candidate "$1"; PG_CONNS[n]=$2; shift 2 ;;
        --sender-arg) need_value "$@"; need_candidate "$1"
                      SENDER_ARGS[n]+="$(printf '%q ' "$2")"; shift 2 ;;
        --bin) need_value "$@"; BIN=$2; shift 2 ;;
        --pg-bin) need_value "$@"; PG_BIN=$2; shift 2 ;;
        --wait) need_value "$@"; WAIT=$2; shift 2 ;;
        --allow-missing) ALLOW_MISSING=true; shift ;;
        --dry-run) DRY_RUN=true; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage_error "unknown argument $1" ;;
    esac
done
[ "$n" -ge 0 ] || usage_error "give at least one --candidate"
for i in $(seq 0 "$n"); do
    for f in WAL_DIRS:--wal-dir PGDATAS:--pgdata STANDBYS:--standby LISTENS:--listen; do
        v="${f%%:*}[$i]"
        [ -n "${!v}" ] || usage_error "candidate ${NAMES[i]} lacks ${f#*:}"
    done
    [ -n "${PG_CONNS[i]}" ] || PG_CONNS[i]=${STANDBYS[i]}
done
[[ "$WAIT" =~ ^[0-9]+$ ]] || usage_error "--wait takes whole seconds"
command -v jq >/dev/null || refuse "jq is needed to read 'wal-receiver status --json' (apt-get install jq)"
if [ -z "$BIN" ]; then
    if command -v wal-receiver >/dev/null; then BIN=$(dirname "$(command -v wal-receiver)")
    else BIN=$REPO/target/release; fi
fi
for b in wal-receiver wal-sender; do [ -x "$BIN/$b" ] || refuse "$BIN/$b is missing (give --bin)"; done
# The programs of the major version a data directory holds: --pg-bin, else Debian's.
pg_bin_for() {
    if [ -n "$PG_BIN" ]; then echo "$PG_BIN"
    else echo "/usr/lib/postgresql/$(cat "$1/PG_VERSION" 2>/dev/null || echo unknown)/bin"; fi
}
for d in "${PGDATAS[@]}"; do
    [ -r "$d/PG_VERSION" ] || [ -n "$PG_BIN" ] || continue # reported with its candidate below
    [ -x "$(pg_bin_for "$d")/pg_ctl" ] || refuse "$(pg_bin_for "$d")/pg_ctl is missing, for $d (give --pg-bin)"
done

# An LSN X/Y as one number, for comparisons.
lsn_num() { local hi=${1%/*} lo=${1#*/}; echo $(( (16#$hi << 32) + 16#$lo )); }

# as_owner DIR CMD...: run CMD as the owner of DIR (PostgreSQL refuses to run as root).
as_owner() {
    local dir=$1; shift
    local owner; owner=$(stat -c %U "$dir")
    if [ "$(id -u)" = 0 ] && [ "$owner" != root ]; then runuser -u "$owner" -- "$@"; else "$@"; fi
}

status_of() { "$BIN/wal-receiver" status --wal-dir "${WAL_DIRS[$1]}" --standby "${STANDBYS[$1]}" --json; }

# 1. What every candidate holds.
say "candidates:"
best=-1 best_tl=0 best_flush=0 system=""
missing=()
declare -a STATUS
for i in $(seq 0 "$n"); do
    if ! s=$(status_of "$i" 2>&1); then
        printf '    %-12s cannot read its store: %s\n' "${NAMES[i]}" "$s"
        missing+=("${NAMES[i]}")
        continue
    fi
    STATUS[i]=$s
    tl=$(jq -r .timeline <<<"$s")
    flush=$(jq -r .flush_lsn <<<"$s")
    sys=$(jq -r .system_identifier <<<"$s")
    reachable=$(jq -r '.standby_server.reachable' <<<"$s")
    recovery=$(jq -r '.standby_server.in_recovery' <<<"$s")
    replay=$(jq -r '.standby_server.replay_lsn // "-"' <<<"$s")
    printf '    %-12s store: timeline %s, flush %s; standby: %s\n' "${NAMES[i]}" "$tl" "$flush" \
        "$([ "$reachable" = true ] && echo "in_recovery=$recovery, replayed to $replay" \
            || echo "unreachable: $(jq -r .standby_server.error <<<"$s")")"
    if [ -n "$system" ] && [ "$sys" != "$system" ]; then
        refuse "the candidates' stores belong to different clusters ($system and $sys)"
    fi
    system=$sys
    if [ "$reachable" = true ] && [ "$recovery" != true ]; then
        refuse "the standby of ${NAMES[i]} is not in recovery: a primary is already running there. Stop it or leave it out"
    fi
    f=$(lsn_num "$flush")
    if [ "$tl" -gt "$best_tl" ] || { [ "$tl" -eq "$best_tl" ] && [ "$f" -gt "$best_flush" ]; }; then
        best=$i best_tl=$tl best_flush=$f
    fi
done
[ "$best" -ge 0 ] || refuse "no candidate's state can be read"
if [ ${#missing[@]} -gt 0 ] && ! $ALLOW_MISSING; then
    refuse "cannot read the state of ${missing[*]}; it might hold more recent WAL than the others. Fix that, or pass --allow-missing to choose without it"
fi
B=$best
chosen_flush=$(jq -r .flush_lsn <<<"${STATUS[B]}")
[ "$(jq -r .standby_server.reachable <<<"${STATUS[B]}")" = true ] \
    || refuse "the standby of ${NAMES[B]}, which holds the most recent WAL, is unreachable; promoting another would lose what only it holds"
say "chose ${NAMES[B]}: its store holds the most recent WAL (timeline $best_tl, up to $chosen_flush)"
if $DRY_RUN; then say "--dry-run: stopping before promotion"; exit 0; fi

# 2. The chosen standby must have everything its store holds before it is promoted.
say "waiting for the standby of ${NAMES[B]} to receive and replay WAL up to $chosen_flush"
deadline=$(( $(date +%s) + WAIT ))
last_replay="" stable=0
while :; do
    s=$(status_of "$B") || refuse "lost the store of ${NAMES[B]}: $s"
    flush=$(jq -r .flush_lsn <<<"$s")
    recv=$(jq -r '.standby_server.receive_lsn // empty' <<<"$s")
    replay=$(jq -r '.standby_server.replay_lsn // empty' <<<"$s")
    if [ -n "$replay" ]; then
        # Replay stops at the last complete record, which may end before the store does
        # (a record cut by the primary's crash): caught up means it received everything
        # and replay stands still.
        if [ "$replay" = "$last_replay" ]; then stable=$((stable + 1)); else stable=0; fi
        last_replay=$replay
        if { [ -z "$recv" ] || [ "$(lsn_num "$recv")" -ge "$(lsn_num "$flush")" ]; } && [ "$stable" -ge 2 ]; then
            break
        fi
    fi
    [ "$(date +%s)" -lt "$deadline" ] \
        || refuse "the standby of ${NAMES[B]} did not catch up within ${WAIT}s (received ${recv:-?}, replayed ${replay:-?}, store $flush); not promoting it, since that would lose acknowledged WAL"
    sleep 1
done
say "caught up: received ${recv:-(restore_command)}, replayed $replay, store $flush"

# 3. Promote.
say "promoting ${PGDATAS[B]}"
as_owner "${PGDATAS[B]}" "$(pg_bin_for "${PGDATAS[B]}")/pg_ctl" promote -D "${PGDATAS[B]}" -w -t "$WAIT" >/dev/null \
    || refuse "pg_ctl promote failed for ${PGDATAS[B]}"
hist=$(ls "${PGDATAS[B]}/pg_wal/" 2>/dev/null | grep -E '^[0-9A-F]{8}\.history$' | sort | tail -1 || true)
if [ -n "$hist" ]; then
    line=$(grep -v '^#' "${PGDATAS[B]}/pg_wal/$hist" | grep . | tail -1 || true)
    switch=$(awk '{print $2}' <<<"$line")
    say "promoted: timeline $((16#${hist%.history})) begins at $switch (history file $hist)"
    if [ -n "$switch" ] && [ "$(lsn_num "$switch")" -lt "$(lsn_num "$chosen_flush")" ]; then
        say "WARNING: the store of ${NAMES[B]} holds $(( $(lsn_num "$chosen_flush") - $(lsn_num "$switch") )) bytes past the switch point $switch, which the new primary does not have. Receivers holding WAL past $switch refuse the new timeline (exit 11) and must be bootstrapped again from ${LISTENS[B]}"
    fi
else
    say "promoted"
fi

# 4. A sender on the new primary.
log=${WAL_DIRS[B]}.sender.log pidfile=${WAL_DIRS[B]}.sender.pid
eval "extra=(${SENDER_ARGS[B]})"
nohup "$BIN/wal-sender" serve --pg-conn "${PG_CONNS[B]}" --listen "${LISTENS[B]}" "${extra[@]}" \
    >"$log" 2>&1 </dev/null &
echo $! >"$pidfile"
host=${LISTENS[B]%:*} port=${LISTENS[B]##*:}
host=${host#[}; host=${host%]}
for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; then
        say "wal-sender listens on ${LISTENS[B]} (pid $(cat "$pidfile"), log $log)"
        say "done: ${NAMES[B]} is the new primary; receivers that list ${LISTENS[B]} follow it by themselves"
        exit 0
    fi
    kill -0 "$(cat "$pidfile")" 2>/dev/null || break
    sleep 0.1
done
printf 'error: the new primary runs, but wal-sender did not start; see %s:\n' "$log" >&2
tail -5 "$log" >&2
exit 1
