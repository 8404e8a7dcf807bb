#!/usr/bin/env bash
# walship end to end, on a throw-away primary in a temporary directory:
#   primary + pgbench load -> wal-sender -> wal-receiver bootstrap + follow -> hot standby,
#   then the receiver is killed with SIGKILL and restarted, the standby catches up, and the
#   standby's data is compared with the primary's.
# Runs with no arguments, as root or not. Installs PostgreSQL 15 if missing (apt-get). In a
# source tree it builds walship (cargo build --release --bins); installed (the Debian
# package puts it in /usr/share/walship/scripts), it runs the wal-sender and wal-receiver
# found in PATH. Everything it starts is stopped and removed on exit, also on failure or
# Ctrl-C.
#
# Environment:
#   WALSHIP_BIN_DIR=DIR  use the wal-sender and wal-receiver in DIR (e.g. /usr/bin)
#   PG_BIN=DIR           the PostgreSQL programs to run, of 15, 16, 17 or 18 (default
#                        /usr/lib/postgresql/15/bin; scripts/install-pg.sh installs 16 to 18)
#   DEMO_KEEP=1          keep the temporary directory (data directories, WAL store, logs)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
NAME=demo
PRIMARY_PORT=5432
STANDBY_PORT=5433
SCALE=10

say() { printf '\n==> %s\n' "$*"; }
info() { printf '    %s\n' "$*"; }
die() { printf '\ndemo FAILED: %s\n' "$*" >&2; exit 1; }
IS_ROOT=false
[ "$(id -u)" = 0 ] && IS_ROOT=true
as_root() { if $IS_ROOT; then "$@"; else sudo "$@"; fi; }
# PostgreSQL refuses to run as root; so do the programs that write the standby's files.
as_pg() { if $IS_ROOT; then runuser -u postgres -- "$@"; else "$@"; fi; }

# --- 1. what is missing ---------------------------------------------------------------------
install_postgres() {
    [ -x "$PG_BIN/initdb" ] && [ -x "$PG_BIN/pgbench" ] && [ -x "$PG_BIN/pg_isready" ] && return
    [ "$PG_BIN" = /usr/lib/postgresql/15/bin ] || die "PG_BIN=$PG_BIN lacks initdb, pgbench or pg_isready (scripts/install-pg.sh installs PostgreSQL 16 to 18 with them)"
    say "installing PostgreSQL 15 (apt-get install postgresql-15)"
    $IS_ROOT || command -v sudo >/dev/null || die "PostgreSQL 15 is missing and sudo is not installed: run this as root"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-15 postgresql-client-15 >/dev/null \
        || die "apt-get install postgresql-15 failed"
    [ -x "$PG_BIN/initdb" ] || die "$PG_BIN/initdb is still missing after installing postgresql-15"
}

build_walship() {
    if [ -n "${WALSHIP_BIN_DIR:-}" ]; then
        say "using the walship binaries in $WALSHIP_BIN_DIR (WALSHIP_BIN_DIR is set: not building)"
        BUILT=$WALSHIP_BIN_DIR
    elif [ -f "$REPO/Cargo.toml" ]; then
        if ! command -v cargo >/dev/null && [ -x "$HOME/.cargo/bin/cargo" ]; then PATH="$HOME/.cargo/bin:$PATH"; fi
        command -v cargo >/dev/null || die "cargo is missing: install Rust with rustup (https://rustup.rs), then run this again"
        say "building walship: cargo build --release --bins"
        cargo build --release --bins || die "cargo build failed"
        BUILT=$REPO/target/release
    else
        # Installed, not in a source tree: the programs in PATH.
        command -v wal-receiver >/dev/null || die "wal-receiver is not in PATH: install walship, or set WALSHIP_BIN_DIR"
        BUILT=$(dirname "$(command -v wal-receiver)")
        say "using the installed walship binaries in $BUILT"
    fi
    for b in wal-sender wal-receiver; do [ -x "$BUILT/$b" ] || die "$BUILT/$b is missing"; done
}

install_postgres
if $IS_ROOT && ! id postgres >/dev/null 2>&1; then die "running as root, but there is no 'postgres' OS user to run PostgreSQL as"; fi
build_walship

# --- the temporary directory and the clean-up -----------------------------------------------
# From here on, what the demo creates is private, as PostgreSQL's data directory (not
# before: apt-get and cargo keep the modes they need).
umask 077
WORK=$(mktemp -d /tmp/walship-demo.XXXXXX)
chmod 700 "$WORK"
if $IS_ROOT; then chown postgres: "$WORK"; fi
# The standby's restore_command runs wal-receiver as the postgres user, and names the
# wal-receiver that ran bootstrap. Binaries postgres cannot run where they are (a source
# tree under /root) are copied for it.
BIN=$(cd "$BUILT" && pwd -P)
if $IS_ROOT && ! runuser -u postgres -- test -x "$BIN/wal-receiver"; then
    BIN=$WORK/bin
    mkdir "$BIN"
    cp "$BUILT/wal-sender" "$BUILT/wal-receiver" "$BIN/"
    chmod 755 "$BIN" "$BIN"/*
    info "(copied to $BIN: the postgres user cannot run them in $BUILT)"
fi
for b in wal-sender wal-receiver; do
    info "$b: $BIN/$b ($("$BIN/$b" --version))"
done
PRIMARY=$WORK/primary STANDBY=$WORK/standby WAL=$WORK/standby.wal
PSOCK=$WORK/primary-sock SSOCK=$WORK/standby-sock
CONN="host=$PSOCK port=$PRIMARY_PORT user=postgres dbname=postgres"
PGBENCH_PID="" SENDER_PID="" FOLLOW_PID=""

cleanup() {
    local rc=$?
    set +e
    trap - INT TERM
    say "cleaning up"
    for pid in "$PGBENCH_PID" "$FOLLOW_PID" "$SENDER_PID"; do [ -n "$pid" ] && kill "$pid" 2>/dev/null; done
    for d in "$STANDBY" "$PRIMARY"; do
        [ -f "$d/postmaster.pid" ] && as_pg "$PG_BIN/pg_ctl" -D "$d" stop -m immediate >/dev/null 2>&1
    done
    for pid in "$PGBENCH_PID" "$FOLLOW_PID" "$SENDER_PID"; do
        [ -n "$pid" ] || continue
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null
    done
    if [ "$rc" = 130 ] || [ "$rc" = 143 ]; then
        info "interrupted"
    elif [ "$rc" != 0 ]; then
        for log in primary sender pgbench bootstrap follow standby; do
            [ -s "$WORK/$log.log" ] || continue
            printf '\n--- last lines of %s ---\n' "$WORK/$log.log" >&2
            tail -n 10 "$WORK/$log.log" >&2
        done
    fi
    if [ -n "${DEMO_KEEP:-}" ]; then info "kept $WORK"; else rm -rf "$WORK"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- helpers ----------------------------------------------------------------------------------
psql_p() { "$PG_BIN/psql" -XAtq -h "$PSOCK" -p "$PRIMARY_PORT" -U postgres -d postgres -c "$1"; }
psql_s() { "$PG_BIN/psql" -XAtq -h "$SSOCK" -p "$STANDBY_PORT" -U postgres -d postgres -c "$1"; }

# spawn VAR LOG USER CMD...: start CMD in the background (USER pg: as postgres when root),
# output appended to LOG; VAR gets the pid of CMD itself, not of runuser, so that signals
# reach it.
spawn() {
    local var=$1 log=$2 user=$3 pidfile
    shift 3
    pidfile=$(mktemp "$WORK/pid.XXXXXX")
    if [ "$user" = pg ] && $IS_ROOT; then
        # shellcheck disable=SC2016 # $$ and $@ belong to the inner shell
        runuser -u postgres -- sh -c 'echo $$ >&3; exec 3>&-; exec "$@"' sh "$@" 3>"$pidfile" >>"$log" 2>&1 </dev/null &
        for _ in $(seq 50); do [ -s "$pidfile" ] && break; sleep 0.1; done
    else
        "$@" >>"$log" 2>&1 </dev/null &
        echo $! > "$pidfile"
    fi
    printf -v "$var" '%s' "$(cat "$pidfile")"
    rm -f "$pidfile"
    [ -n "${!var}" ] || die "could not start $1 (see $log)"
}

# wait_for SECONDS WHAT CMD...: poll CMD until it succeeds.
wait_for() {
    local limit=$1 what=$2 deadline=$((SECONDS + $1))
    shift 2
    until "$@"; do
        [ "$SECONDS" -lt "$deadline" ] || die "$what: not done after ${limit}s"
        sleep 0.5
    done
}

free_port() {
    local p
    for _ in $(seq 100); do
        p=$((20000 + RANDOM % 20000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "$p"; return; fi
    done
    die "found no free TCP port on 127.0.0.1"
}

alive() { kill -0 "$1" 2>/dev/null; }
# check_running: fail with the log to read if a process the demo needs has exited.
check_running() {
    alive "$SENDER_PID" || die "wal-sender exited (see $WORK/sender.log)"
    [ -z "$FOLLOW_PID" ] || alive "$FOLLOW_PID" || die "wal-receiver follow exited (see $WORK/follow.log)"
    [ -z "$PGBENCH_PID" ] || alive "$PGBENCH_PID" || die "pgbench exited (see $WORK/pgbench.log)"
}
status_field() {  # FIELD: a field of 'wal-receiver status --json' (string or number)
    # (the nested "standby" object, last in the JSON, has fields of the same names: cut it)
    "$BIN/wal-receiver" status --json --wal-dir "$WAL" 2>/dev/null | sed -E 's/,"standby":.*$/}/' \
        | sed -nE "s/.*\"$1\":\"?([^\",}]*)\"?[,}].*/\1/p"
}
sender_listening() { alive "$SENDER_PID" || die "wal-sender exited (see $WORK/sender.log)"; grep -q "wal-sender listening" "$WORK/sender.log"; }
standby_running() { as_pg "$PG_BIN/pg_ctl" -D "$STANDBY" status >/dev/null 2>&1; }
standby_ready() {
    # (pg_ctl -W returns before the postmaster writes postmaster.pid: give it 15 s to appear)
    if [ -f "$STANDBY/postmaster.pid" ] || [ $((SECONDS - STANDBY_STARTED)) -ge 15 ]; then
        standby_running || die "the standby is not running (see $WORK/standby.log)"
    fi
    [ "$(psql_s "SELECT pg_is_in_recovery()" 2>/dev/null)" = t ]
}

# One line: primary flush LSN, receiver flush LSN, standby replay LSN, and the byte lags.
header() { printf '    %-8s %-14s %-14s %-14s %14s %14s\n' time primary_flush receiver_flush standby_replay receiver_lag_B standby_lag_B; }
row() {
    local recv replay p lr ls
    recv=$(status_field flush_lsn)
    replay=$(psql_s "SELECT pg_last_wal_replay_lsn()" 2>/dev/null || true)
    IFS='|' read -r p lr ls < <(psql_p "SELECT pg_current_wal_flush_lsn(),
        pg_current_wal_flush_lsn() - '${recv:-0/0}'::pg_lsn, pg_current_wal_flush_lsn() - '${replay:-0/0}'::pg_lsn")
    printf '    %-8s %-14s %-14s %-14s %14s %14s\n' "$(date +%T)" "$p" "${recv:-?}" "${replay:-?}" "$lr" "$ls"
}

# --- 2. the primary -----------------------------------------------------------------------------
say "creating a throw-away primary in $PRIMARY (Unix socket $PSOCK, port $PRIMARY_PORT)"
as_pg mkdir -p "$PSOCK" "$SSOCK"
as_pg "$PG_BIN/initdb" -D "$PRIMARY" -A trust -U postgres > "$WORK/initdb.log" 2>&1 || die "initdb failed"
cat >> "$PRIMARY/postgresql.conf" <<EOF
listen_addresses = ''
unix_socket_directories = '$PSOCK'
port = $PRIMARY_PORT
wal_level = replica
max_wal_senders = 10
max_replication_slots = 10
EOF
as_pg "$PG_BIN/pg_ctl" -D "$PRIMARY" -l "$WORK/primary.log" -w start >/dev/null || die "the primary did not start"
info "primary: $("$PG_BIN/psql" -XAtq -d "$CONN" -c "SELECT version()" | cut -d, -f1)"
say "pgbench -i -s $SCALE (about $((SCALE * 100000)) accounts)"
"$PG_BIN/pgbench" -i -q -s "$SCALE" "$CONN" > "$WORK/pgbench-init.log" 2>&1 || die "pgbench -i failed"

# --- 3. the sender and the load -------------------------------------------------------------------
SENDER_ADDR=127.0.0.1:$(free_port)
say "starting wal-sender serve on $SENDER_ADDR"
spawn SENDER_PID "$WORK/sender.log" me "$BIN/wal-sender" serve --pg-conn "$CONN" --listen "$SENDER_ADDR" --pgdata "$PRIMARY"
wait_for 30 "wal-sender listening" sender_listening
say "starting the load: pgbench -c 4 -T 3600 (in the background)"
spawn PGBENCH_PID "$WORK/pgbench.log" me "$PG_BIN/pgbench" -n -c 4 -T 3600 "$CONN"
sleep 3
alive "$PGBENCH_PID" || die "pgbench stopped (see $WORK/pgbench.log)"
info "primary flush LSN $(psql_p "SELECT pg_current_wal_flush_lsn()"), $(psql_p "SELECT count(*) FROM pgbench_history") transactions so far"

# --- 4. bootstrap, follow, standby ----------------------------------------------------------------
say "wal-receiver bootstrap --sender $SENDER_ADDR --name $NAME --pgdata $STANDBY --wal-dir $WAL --port $STANDBY_PORT --socket-dir $SSOCK --listen-addresses ''  (under load)"
t0=$SECONDS
as_pg "$BIN/wal-receiver" bootstrap --sender "$SENDER_ADDR" --name "$NAME" --pgdata "$STANDBY" --wal-dir "$WAL" \
    --port "$STANDBY_PORT" --socket-dir "$SSOCK" --listen-addresses '' \
    > "$WORK/bootstrap.log" 2>&1 || die "wal-receiver bootstrap failed (exit $?)"
info "done in $((SECONDS - t0))s: $(du -sh "$STANDBY" | cut -f1) of data directory"
grep -o "snapshot received.*" "$WORK/bootstrap.log" | sed 's/^/    bootstrap log: /' || true
info "the standby's recovery settings:"
grep -hE "^[[:space:]]*(primary_conninfo|restore_command|recovery_target|wal_retrieve_retry_interval|port|unix_socket_directories|listen_addresses)" \
    "$STANDBY/postgresql.auto.conf" 2>/dev/null | sed 's/^/      /' || true
[ -f "$STANDBY/standby.signal" ] || die "bootstrap left no standby.signal in $STANDBY"
grep -qF "restore_command = '$(realpath "$BIN/wal-receiver") restore-wal " "$STANDBY/postgresql.auto.conf" \
    || die "the standby's restore_command does not run $BIN/wal-receiver"

say "starting wal-receiver follow --sender $SENDER_ADDR --name $NAME --wal-dir $WAL --serve-standby $WAL"
info "(--serve-standby: the standby streams from the receiver over PostgreSQL's replication protocol)"
spawn FOLLOW_PID "$WORK/follow.log" pg "$BIN/wal-receiver" follow --sender "$SENDER_ADDR" --name "$NAME" --wal-dir "$WAL" --serve-standby "$WAL"

say "starting the standby: pg_ctl -D $STANDBY start (no options: bootstrap wrote port $STANDBY_PORT and socket $SSOCK into its configuration); waiting for read-only queries"
as_pg touch "$WORK/standby.log"
STANDBY_STARTED=$SECONDS
as_pg "$PG_BIN/pg_ctl" -D "$STANDBY" -l "$WORK/standby.log" -W start >/dev/null || die "pg_ctl start of the standby failed"
wait_for 180 "the standby accepting read-only queries" standby_ready
info "the standby answers after $((SECONDS - STANDBY_STARTED))s: pg_is_in_recovery() = $(psql_s "SELECT pg_is_in_recovery()"), $(psql_s "SELECT count(*) FROM pgbench_history") transactions visible"
check_running
streaming() { [ "$(psql_s "SELECT status FROM pg_stat_wal_receiver" 2>/dev/null)" = streaming ]; }
wait_for 60 "the standby streaming from the receiver" streaming
info "the standby's WAL receiver: $(psql_s "SELECT status || ' from ' || sender_host FROM pg_stat_wal_receiver")"
header; row

# --- 5. kill the receiver ---------------------------------------------------------------------------
say "killing wal-receiver follow with SIGKILL (pid $FOLLOW_PID): the primary's slot walship_$NAME keeps its WAL"
kill -9 "$FOLLOW_PID"
wait "$FOLLOW_PID" 2>/dev/null || true  # (when it is our child: no "Killed" job message)
follow_gone() { ! alive "$FOLLOW_PID"; }
wait_for 10 "wal-receiver to die" follow_gone
FOLLOW_PID=""
for _ in 1 2 3 4; do
    sleep 1
    info "receiver down: running=$(status_field receiver_running), store flush $(status_field flush_lsn), primary flush $(psql_p "SELECT pg_current_wal_flush_lsn()"), slot restart_lsn $(psql_p "SELECT restart_lsn FROM pg_replication_slots WHERE slot_name = 'walship_$NAME'")"
done
say "restarting wal-receiver follow: it resumes at its store's flush position"
old_lines=$(wc -l < "$WORK/follow.log")
spawn FOLLOW_PID "$WORK/follow.log" pg "$BIN/wal-receiver" follow --sender "$SENDER_ADDR" --name "$NAME" --wal-dir "$WAL" --serve-standby "$WAL"
sleep 1
resumed=$(tail -n +$((old_lines + 1)) "$WORK/follow.log" | grep -o "requesting WAL start_lsn=[0-9A-F/]*" | tail -n 1 || true)
[ -z "$resumed" ] || info "wal-receiver log: $resumed"

# --- 6. catching up -------------------------------------------------------------------------------------
say "the standby catching up under load (byte lags are measured against the primary's flush LSN)"
header
for _ in 1 2 3 4 5; do
    sleep 2
    check_running
    row
done

# --- 7. stop the load and compare ---------------------------------------------------------------------
say "stopping the load"
# (SIGTERM: a background job of a script ignores SIGINT)
kill -TERM "$PGBENCH_PID" 2>/dev/null || true
pgbench_gone() { ! alive "$PGBENCH_PID"; }
wait_for 10 "pgbench to exit" pgbench_gone
wait "$PGBENCH_PID" 2>/dev/null || true
PGBENCH_PID=""
no_pgbench() { [ "$(psql_p "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgbench'")" = 0 ]; }
wait_for 30 "pgbench's sessions to end on the primary" no_pgbench
TARGET=$(psql_p "SELECT pg_current_wal_flush_lsn()")
info "primary flush LSN after the load: $TARGET"

say "waiting for the receiver and then the standby's replay to reach $TARGET"
reached() { [ "$(psql_p "SELECT '${1:-0/0}'::pg_lsn >= '$TARGET'::pg_lsn")" = t ]; }
recv_reached() { check_running; reached "$(status_field flush_lsn)"; }
replay_lsn() { psql_s "SELECT pg_last_wal_replay_lsn()" 2>/dev/null || true; }
wait_for 60 "the receiver's flush position reaching $TARGET" recv_reached
info "receiver flush: $(status_field flush_lsn)"
header
t0=$SECONDS next=0 switched=false
until reached "$(replay_lsn)"; do
    standby_running || die "the standby stopped (see $WORK/standby.log)"
    if [ $((SECONDS - t0)) -ge "$next" ]; then row; next=$((next + 10)); fi
    if ! $switched && [ $((SECONDS - t0)) -ge 60 ]; then
        info "no replay of the last partial segment after 60s: forcing a segment switch on the primary"
        psql_p "SELECT pg_switch_wal()" >/dev/null
        switched=true
    fi
    [ $((SECONDS - t0)) -lt 120 ] || die "the standby did not replay up to $TARGET within 120s"
    sleep 0.5
done
row
info "the standby replayed up to $TARGET in $((SECONDS - t0))s"

say "comparing the standby's data with the primary's"
CHECK="SELECT 'pgbench_accounts', sum(abalance), count(*) FROM pgbench_accounts
 UNION ALL SELECT 'pgbench_branches', sum(bbalance), count(*) FROM pgbench_branches
 UNION ALL SELECT 'pgbench_tellers', sum(tbalance), count(*) FROM pgbench_tellers
 UNION ALL SELECT 'pgbench_history', sum(delta), count(*) FROM pgbench_history"
ON_PRIMARY=$(psql_p "$CHECK")
ON_STANDBY=$(psql_s "$CHECK")
printf '    %-18s %-28s %-28s\n' table "primary sum | count" "standby sum | count"
paste -d'|' <(printf '%s\n' "$ON_PRIMARY") <(printf '%s\n' "$ON_STANDBY") \
    | awk -F'|' '{ printf "    %-18s %-28s %-28s %s\n", $1, $2 " | " $3, $5 " | " $6, ($2 == $5 && $3 == $6) ? "same" : "DIFFERENT" }'
if [ -z "$ON_PRIMARY" ] || [ "$ON_PRIMARY" != "$ON_STANDBY" ]; then die "the standby's data differs from the primary's"; fi

say "the WAL store"
"$BIN/wal-receiver" status --wal-dir "$WAL" | sed 's/^/    /'
printf '\ndemo passed\n'
