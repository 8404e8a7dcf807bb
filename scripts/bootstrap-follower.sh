#!/usr/bin/env bash
# Turns this host into a hot standby fed by walship:
#   1. wal-receiver bootstrap  (snapshot of the primary into --pgdata, WAL into --wal-dir)
#   2. wal-receiver follow     (in the background, keeps --wal-dir current)
#   3. pg_ctl start            (the standby replays WAL through restore_command)
# and waits until the standby answers read-only queries. It prints what it started, and how
# to stop and restart it, also when that wait fails. Run it with --help for the flags.
set -euo pipefail
# What it creates (data directory, WAL store, logs, pid file) is private to its owner, as
# PostgreSQL's data directory is.
umask 077
# Creates DIR private, and its missing parents as mkdir -p does under a usual umask (0755):
# the postgres user must be able to pass through a parent that root creates here.
make_dir() { (umask 022 && mkdir -p "$(dirname "$1")") && mkdir -p "$1"; }

SCRIPT_DIR=$(cd "$(dirname "$0")" && pwd)
REPO=$(dirname "$SCRIPT_DIR")

usage() {
    cat <<EOF
Usage: $(basename "$0") --sender HOST:PORT --name NAME --pgdata DIR --port PORT [options]

Bootstraps a PostgreSQL (15 to 18) hot standby from a wal-sender, starts 'wal-receiver follow' in
the background and starts the standby. Run it on the new standby host, as root or as the
OS user that will run PostgreSQL. As root, PostgreSQL and wal-receiver run as 'postgres'.

Required:
  --sender HOST:PORT          the wal-sender on the primary's host; repeat it to also list
                              the senders of nodes that may become primary after a
                              failover (see scripts/failover.sh): the receiver follows the
                              primary on the highest timeline among them
  --name NAME                 this receiver's name ([a-z0-9_], at most 55 characters); the
                              primary keeps WAL for it in the replication slot walship_NAME
  --pgdata DIR                the standby's data directory; must be empty or absent, or
                              hold an unfinished bootstrap (which is then resumed)
  --port PORT                 the port the standby listens on. bootstrap writes it into
                              the standby's postgresql.auto.conf, so a plain 'pg_ctl
                              start', or a service manager, starts it there

Options:
  --wal-dir DIR               the WAL store (default: <pgdata>.wal). The standby's
                              restore_command reads it, so keep it as long as the standby
  --tablespace-mapping OLD=NEW
                              restore the primary's tablespace OLD into directory NEW on
                              this host; repeat for each tablespace
  --socket-dir DIR            the standby's unix_socket_directories, written into its
                              postgresql.auto.conf as --port is (default: the primary's)
  --listen-addresses ADDRS    the standby's listen_addresses, likewise: '*', a list of
                              addresses, or '' for the Unix socket only (default: the
                              primary's)
  --bin DIR                   where wal-receiver lives (default: \$WALSHIP_BIN_DIR, else the
                              directory of 'command -v wal-receiver', else
                              $REPO/target/release)
  --pg-bin DIR                PostgreSQL binaries of the primary's major version
                              (default: /usr/lib/postgresql/N/bin, N the major version
                              the bootstrap copies)
  --db-user USER              role that checks the standby with psql (default: postgres).
                              psql runs as you, so PGPASSWORD, PGPASSFILE, ~/.pgpass and
                              the PGSSL* variables apply as to any psql you run; as root,
                              when the standby refuses root by peer authentication, it
                              runs as the postgres OS user (PGPASSWORD and PGPASSFILE
                              still apply, ~ is then postgres's home)
  --standby-feed HOW          stream (default): the standby streams from 'follow
                              --serve-standby' on a socket in the WAL store, with
                              restore_command as the fallback; restore-command: only
                              restore_command
  --tls-ca FILE               TLS to the sender: the CA that signs its certificate
  --tls-cert FILE             this receiver's certificate, for a sender that requires client
                              certificates (must carry NAME); with --tls-key FILE
  --tls-key FILE              the key of --tls-cert
  --tls-server-name NAME      the name the sender's certificate carries, if not its host
  --timeout SECONDS           how long to wait for the standby to accept queries (default: 300)
  -h, --help                  show this help

Exit status: 0 the standby is up and in recovery; 1 a step failed (the message says which;
if the standby was started, the summary of what runs is printed first).

Files it creates next to the WAL store and the data directory:
  <wal-dir>.follow.log        log of 'wal-receiver follow'
  <wal-dir>.follow.pid        its process id (stop it with: kill \$(cat <wal-dir>.follow.pid))
  <pgdata>.log                the standby's server log
  <wal-dir>.bin/              as root only, when the postgres user cannot run the binaries
                              where they are: a copy of wal-receiver (restore_command uses it)
EOF
}

say() { printf '==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

IS_ROOT=false
[ "$(id -u)" = 0 ] && IS_ROOT=true
# as_pg CMD...: run CMD as the postgres OS user when we are root.
as_pg() { if $IS_ROOT; then runuser -u postgres -- "$@"; else "$@"; fi; }
PG_USER="user $(id -un)" AS_PG=""
! $IS_ROOT || { PG_USER="the postgres user"; AS_PG="runuser -u postgres -- "; }

SENDERS=() NAME="" PGDATA_DIR="" PORT="" WAL_DIR="" SOCKET_DIR="" BIN="${WALSHIP_BIN_DIR:-}" DB_USER=postgres
LISTEN=() # (--listen-addresses ADDRS: an empty value is meaningful)
PG_BIN=""
TIMEOUT=300
MAPPINGS=()
TLS_ARGS=()
FEED=stream

need_value() { if [ $# -lt 2 ] || [ -z "$2" ]; then die "$1 needs a value (see --help)"; fi; }
while [ $# -gt 0 ]; do
    case $1 in
        -h|--help) usage; exit 0 ;;
        --sender) need_value "$@"; SENDERS+=("$2"); shift 2 ;;
        --name) need_value "$@"; NAME=$2; shift 2 ;;
        --pgdata) need_value "$@"; PGDATA_DIR=$2; shift 2 ;;
        --port) need_value "$@"; PORT=$2; shift 2 ;;
        --wal-dir) need_value "$@"; WAL_DIR=$2; shift 2 ;;
        --tablespace-mapping) need_value "$@"; MAPPINGS+=("$2"); shift 2 ;;
        --socket-dir) need_value "$@"; SOCKET_DIR=$2; shift 2 ;;
        --listen-addresses) [ $# -ge 2 ] || die "$1 needs a value (see --help)"; LISTEN=(--listen-addresses "$2"); shift 2 ;;
        --bin) need_value "$@"; BIN=$2; shift 2 ;;
        --pg-bin) need_value "$@"; PG_BIN=$2; shift 2 ;;
        --db-user) need_value "$@"; DB_USER=$2; shift 2 ;;
        --timeout) need_value "$@"; TIMEOUT=$2; shift 2 ;;
        --tls-ca|--tls-cert|--tls-key|--tls-server-name) need_value "$@"; TLS_ARGS+=("$1" "$2"); shift 2 ;;
        --standby-feed) need_value "$@"; FEED=$2; shift 2 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done

# --- checks -------------------------------------------------------------------------------
[ ${#SENDERS[@]} -gt 0 ] || die "--sender HOST:PORT is required (see --help)"
SENDER_ARGS=()
for s in "${SENDERS[@]}"; do
    [[ $s == *:* ]] || die "--sender must be HOST:PORT, got '$s'"
    SENDER_ARGS+=(--sender "$s")
done
SENDER=${SENDERS[*]}
[ -n "$NAME" ] || die "--name NAME is required (see --help)"
[ -n "$PGDATA_DIR" ] || die "--pgdata DIR is required (see --help)"
[ -n "$PORT" ] || die "--port PORT is required (see --help)"
[[ $FEED == stream || $FEED == restore-command ]] || die "--standby-feed must be stream or restore-command, got '$FEED'"
[[ $NAME =~ ^[a-z0-9_]{1,55}$ ]] || die "--name must be 1 to 55 characters of [a-z0-9_], got '$NAME'"
if ! [[ $PORT =~ ^[0-9]{1,5}$ ]] || [ "$PORT" -lt 1 ] || [ "$PORT" -gt 65535 ]; then
    die "--port must be a number from 1 to 65535, got '$PORT'"
fi
[[ $TIMEOUT =~ ^[0-9]+$ ]] || die "--timeout must be a number of seconds, got '$TIMEOUT'"
for m in "${MAPPINGS[@]+"${MAPPINGS[@]}"}"; do
    [[ $m == ?*=?* ]] || die "--tablespace-mapping must be OLD=NEW, got '$m'"
done

# Absolute paths: pg_ctl, restore_command and the pid file must not depend on our cwd.
PGDATA_DIR=$(realpath -m "$PGDATA_DIR")
WAL_DIR=$(realpath -m "${WAL_DIR:-$PGDATA_DIR.wal}")
[ -z "$SOCKET_DIR" ] || SOCKET_DIR=$(realpath -m "$SOCKET_DIR")
FOLLOW_LOG="$WAL_DIR.follow.log"
FOLLOW_PID="$WAL_DIR.follow.pid"
PG_LOG="$PGDATA_DIR.log"

# Client programs for the checks before the bootstrap: --pg-bin's, else the newest installed
# (they talk to every version). The server's own are chosen once the copy tells its version.
CHECK_BIN=${PG_BIN:-$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin 2>/dev/null | sort -V | tail -n 1)}
for tool in pg_isready psql; do
    [ -x "$CHECK_BIN/$tool" ] || die "${CHECK_BIN:-/usr/lib/postgresql/N/bin}/$tool not found: install PostgreSQL (e.g. apt-get install postgresql-15) or pass --pg-bin"
done
if $IS_ROOT; then
    id postgres >/dev/null 2>&1 || die "running as root, but there is no 'postgres' OS user to run PostgreSQL and wal-receiver as"
fi

if [ -z "$BIN" ]; then
    if command -v wal-receiver >/dev/null 2>&1; then
        BIN=$(dirname "$(command -v wal-receiver)")
    else
        BIN="$REPO/target/release"
    fi
fi
BIN=$(realpath -m "$BIN")
[ -x "$BIN/wal-receiver" ] || die "$BIN/wal-receiver not found: build it with 'cargo build --release' or pass --bin DIR"

# wal-receiver bootstrap leaves this marker in an unfinished target, and resumes it.
MARKER=walship-bootstrap.incomplete
RESUME=false
if [ -e "$PGDATA_DIR" ]; then
    [ -d "$PGDATA_DIR" ] || die "--pgdata $PGDATA_DIR exists and is not a directory"
    if [ -e "$PGDATA_DIR/$MARKER" ]; then
        RESUME=true
    elif [ -n "$(ls -A "$PGDATA_DIR")" ]; then
        die "--pgdata $PGDATA_DIR is not empty and holds no unfinished bootstrap; give an empty or absent directory"
    fi
fi
for h in "${SOCKET_DIR:-/var/run/postgresql}" 127.0.0.1; do
    # pg_isready: 0 accepting, 1 rejecting (starting up): either way the port is taken
    prc=0
    "$CHECK_BIN/pg_isready" -q -h "$h" -p "$PORT" -t 3 >/dev/null 2>&1 || prc=$?
    if [ "$prc" -le 1 ]; then die "a server already listens on port $PORT ($h): choose another --port"; fi
done
if [ -f "$FOLLOW_PID" ] && kill -0 "$(cat "$FOLLOW_PID")" 2>/dev/null; then
    die "a wal-receiver follow is already running for $WAL_DIR (pid $(cat "$FOLLOW_PID"), from $FOLLOW_PID)"
fi

# --- the binary the postgres user runs ----------------------------------------------------
# As root, wal-receiver runs as postgres, and the standby's restore_command runs it too, for
# as long as the standby lives. If postgres cannot run it where it is (e.g. under /root),
# copy it next to the WAL store, where it stays.
if $IS_ROOT && ! runuser -u postgres -- test -x "$BIN/wal-receiver"; then
    say "the postgres user cannot run $BIN/wal-receiver; copying it to $WAL_DIR.bin"
    make_dir "$WAL_DIR.bin"
    cp "$BIN/wal-receiver" "$WAL_DIR.bin/wal-receiver"
    chmod 755 "$WAL_DIR.bin" "$WAL_DIR.bin/wal-receiver"
    BIN="$WAL_DIR.bin"
    runuser -u postgres -- test -x "$BIN/wal-receiver" \
        || die "the postgres user cannot run $BIN/wal-receiver either: check the permissions of $(dirname "$WAL_DIR")"
fi
RECEIVER="$BIN/wal-receiver"

# --- directories ------------------------------------------------------------------------
# As root, bootstrap and pg_ctl run as postgres, so postgres must be able to create or write
# the data directory, the WAL store, the socket directory and the tablespace directories.
# Where their parent belongs to root (e.g. /var/lib/walship), create them here for postgres.
pg_can() { if $IS_ROOT; then runuser -u postgres -- test "$@"; else test "$@"; fi; }
nearest_existing() { local d=$1; while [ ! -e "$d" ]; do d=$(dirname "$d"); done; printf '%s' "$d"; }
prepare_dir() {  # DIR MODE
    local dir=$1 mode=$2
    if [ -e "$dir" ]; then
        if $IS_ROOT && [ -d "$dir" ] && [ -z "$(ls -A "$dir")" ] && ! pg_can -w "$dir"; then
            chown postgres: "$dir"; chmod "$mode" "$dir"
        fi
    elif ! pg_can -w "$(nearest_existing "$dir")"; then
        if $IS_ROOT; then
            make_dir "$dir"; chown postgres: "$dir"; chmod "$mode" "$dir"
        fi
    fi
    local probe=$dir
    [ -e "$dir" ] || probe=$(nearest_existing "$dir")
    pg_can -w "$probe" -a -x "$probe" || die "$PG_USER cannot write $probe (needed for $dir)"
}
prepare_dir "$PGDATA_DIR" 700
prepare_dir "$WAL_DIR" 700
for m in "${MAPPINGS[@]+"${MAPPINGS[@]}"}"; do
    [[ $m == *\\* ]] || prepare_dir "${m#*=}" 700  # (skip paths with escaped '=')
done
if [ -n "$SOCKET_DIR" ]; then
    [ -d "$SOCKET_DIR" ] || { make_dir "$SOCKET_DIR"; ! $IS_ROOT || chown postgres: "$SOCKET_DIR"; }
    pg_can -w "$SOCKET_DIR" || die "the standby cannot create its socket in --socket-dir $SOCKET_DIR"
fi
if $IS_ROOT; then
    touch "$PG_LOG"
    chown postgres: "$PG_LOG"
fi

# --- 1. bootstrap --------------------------------------------------------------------------
BOOT_ARGS=(bootstrap "${SENDER_ARGS[@]}" --name "$NAME" --pgdata "$PGDATA_DIR" --wal-dir "$WAL_DIR")
# Where the standby listens goes into its postgresql.auto.conf: pg_ctl needs no options.
BOOT_ARGS+=(--port "$PORT" "${LISTEN[@]+"${LISTEN[@]}"}")
[ -z "$SOCKET_DIR" ] || BOOT_ARGS+=(--socket-dir "$SOCKET_DIR")
for m in "${MAPPINGS[@]+"${MAPPINGS[@]}"}"; do BOOT_ARGS+=(--tablespace-mapping "$m"); done
BOOT_ARGS+=("${TLS_ARGS[@]+"${TLS_ARGS[@]}"}" --standby-feed "$FEED")
# With the streaming feed, follow serves the standby on a socket in the WAL store, which is
# where bootstrap points primary_conninfo by default.
SERVE_ARGS=()
[ "$FEED" != stream ] || SERVE_ARGS=(--serve-standby "$WAL_DIR")

if $RESUME; then
    say "resuming the unfinished bootstrap in $PGDATA_DIR from $SENDER as receiver '$NAME' (WAL store $WAL_DIR)"
else
    say "bootstrapping $PGDATA_DIR from $SENDER as receiver '$NAME' (WAL store $WAL_DIR)"
fi
rc=0
as_pg "$RECEIVER" "${BOOT_ARGS[@]}" || rc=$?
if [ "$rc" != 0 ]; then
    case $rc in
        3) hint="the primary no longer has the WAL this receiver needs" ;;
        4) hint="the sender refused this receiver, or $WAL_DIR holds another cluster's WAL" ;;
        5) hint="the WAL store $WAL_DIR is corrupt or inconsistent" ;;
        6) hint="another wal-receiver holds $WAL_DIR" ;;
        7) hint="a write or fsync failed: check the disk" ;;
        8) hint="$PGDATA_DIR or a tablespace directory is not empty (use --tablespace-mapping for tablespaces)" ;;
        9) hint="TLS or identity refused (see the message above: certificate, CA, host name or receiver name)" ;;
        10) hint="the sender sent an unsafe file name; nothing was written outside the target" ;;
        12) hint="the sender cannot use the primary as configured (the message above names the fix: password, pg_hba.conf, role, grants, wal_level, wal senders or slots)" ;;
        13) hint="the WAL store $WAL_DIR is open to other users or belongs to another OS user (the message above names the fix)" ;;
        2) hint="bad command line, or an argument that cannot be used as given (see the message above)" ;;
        *) hint="see the messages above" ;;
    esac
    if [ -e "$PGDATA_DIR/$MARKER" ]; then
        hint+=". The unfinished bootstrap in $PGDATA_DIR resumes if you run this again with the same arguments"
    fi
    if [ "$rc" != 2 ]; then
        hint+=". If you give up on it, drop the slot it may have created on the primary: SELECT pg_drop_replication_slot('walship_$NAME')"
    fi
    die "wal-receiver bootstrap failed (exit $rc): $hint"
fi
[ -f "$PGDATA_DIR/standby.signal" ] || die "bootstrap exited 0 but $PGDATA_DIR/standby.signal is missing"
# The standby runs on the programs of the major version it was copied from.
PG_MAJOR=$(cat "$PGDATA_DIR/PG_VERSION")
PG_BIN=${PG_BIN:-/usr/lib/postgresql/$PG_MAJOR/bin}
pg_version=$("$PG_BIN/postgres" --version 2>/dev/null || true)
if ! [[ $pg_version =~ \)\ $PG_MAJOR([.a-z]|$) ]] || ! [ -x "$PG_BIN/pg_ctl" ]; then
    die "the primary runs PostgreSQL $PG_MAJOR, but $PG_BIN holds ${pg_version:-no PostgreSQL server}. $PGDATA_DIR is bootstrapped: start 'wal-receiver follow' on $WAL_DIR and the standby with PostgreSQL $PG_MAJOR's pg_ctl yourself"
fi
restore_cmd=$(grep -h "^[[:space:]]*restore_command" "$PGDATA_DIR/postgresql.auto.conf" "$PGDATA_DIR/postgresql.conf" 2>/dev/null | tail -n 1 || true)
[ -z "$restore_cmd" ] || say "recovery: $restore_cmd"

# --- 2. follow -----------------------------------------------------------------------------
# The pid file gets the pid of wal-receiver itself (not of runuser): the shell run as
# postgres writes its own pid to fd 3, opened here, then execs wal-receiver.
say "starting wal-receiver follow in the background (log $FOLLOW_LOG)"
if $IS_ROOT; then
    nohup runuser -u postgres -- sh -c 'echo $$ >&3; exec 3>&-; exec "$@"' sh \
        "$RECEIVER" follow "${SENDER_ARGS[@]}" --name "$NAME" --wal-dir "$WAL_DIR" \
        "${TLS_ARGS[@]+"${TLS_ARGS[@]}"}" "${SERVE_ARGS[@]+"${SERVE_ARGS[@]}"}" \
        3>"$FOLLOW_PID" >>"$FOLLOW_LOG" 2>&1 </dev/null &
else
    nohup sh -c 'echo $$ >&3; exec 3>&-; exec "$@"' sh \
        "$RECEIVER" follow "${SENDER_ARGS[@]}" --name "$NAME" --wal-dir "$WAL_DIR" \
        "${TLS_ARGS[@]+"${TLS_ARGS[@]}"}" "${SERVE_ARGS[@]+"${SERVE_ARGS[@]}"}" \
        3>"$FOLLOW_PID" >>"$FOLLOW_LOG" 2>&1 </dev/null &
fi
for _ in $(seq 50); do [ -s "$FOLLOW_PID" ] && break; sleep 0.1; done
FPID=$(cat "$FOLLOW_PID" 2>/dev/null || true)
[ -n "$FPID" ] || die "wal-receiver follow did not start: see $FOLLOW_LOG"
sleep 1
if ! kill -0 "$FPID" 2>/dev/null; then
    tail -n 20 "$FOLLOW_LOG" >&2 || true
    die "wal-receiver follow exited at once: see $FOLLOW_LOG"
fi
# From here on, a failure leaves the receiver (and maybe the standby) running: say so.
report_leftovers() {
    local rc=$?
    [ "$rc" = 0 ] && return
    printf '\nstill running after this failure (nothing was stopped):\n' >&2
    ! kill -0 "$FPID" 2>/dev/null || printf '  wal-receiver follow, pid %s: kill %s\n' "$FPID" "$FPID" >&2
    if [ -f "$PGDATA_DIR/postmaster.pid" ]; then
        printf '  the standby: %s%s -D %s stop\n' "$AS_PG" "$PG_BIN/pg_ctl" "$PGDATA_DIR" >&2
    fi
}
trap report_leftovers EXIT

# --- 3. the standby ------------------------------------------------------------------------
# No -o: bootstrap wrote the port (and the socket directory and addresses, when given) into
# postgresql.auto.conf, so this start is the same as any later one, by hand or by a service
# manager.

# standby_psql SQL: one query on the standby, made as the operator's own psql would make it:
# as the user running this script, with its PGPASSWORD, PGPASSFILE, ~/.pgpass and PGSSL*
# settings. As root, when the standby refuses root by peer authentication (Debian's
# "local all postgres peer"), as the postgres OS user instead. Prints the result or psql's
# error, and returns psql's exit status. Never prompts for a password.
standby_psql() {
    local out rc=0
    out=$("$PG_BIN/psql" -XAtqw -h "$host" -p "$PORT" -U "$DB_USER" -d postgres -c "$1" 2>&1) || rc=$?
    if [ "$rc" != 0 ] && $IS_ROOT && [[ $out == *"Peer authentication failed"* ]]; then
        rc=0
        out=$(runuser -u postgres -- "$PG_BIN/psql" -XAtqw -h "$host" -p "$PORT" -U "$DB_USER" \
            -d postgres -c "$1" 2>&1) || rc=$?
    fi
    printf '%s' "$out"
    return "$rc"
}
# login_refused ERROR: whether psql's ERROR is one that waiting cannot fix: the server is up
# and accepted the connection, but refused the login.
login_refused() {
    case $1 in
        *"authentication failed"*|*"no password supplied"*|*"no pg_hba.conf entry"*|\
        *"does not exist"*|*"permission denied"*) return 0 ;;
    esac
    return 1
}

# wait_ready: waits until the standby accepts read-only queries in recovery; sets READY, or
# REASON to why not.
READY=false REASON="" host=""
wait_ready() {
    # Where to reach it: postmaster.pid has the socket directory (line 5) and listen address (6).
    say "waiting for the standby to reach a consistent state and accept read-only queries (up to ${TIMEOUT}s)"
    local started deadline out last_err=""
    started=$(date +%s)
    deadline=$((started + TIMEOUT))
    while :; do
        # (pg_ctl -W returns before the postmaster writes postmaster.pid: give it 15 s to appear)
        if [ -f "$PGDATA_DIR/postmaster.pid" ] || [ $(($(date +%s) - started)) -ge 15 ]; then
            if ! as_pg "$PG_BIN/pg_ctl" -D "$PGDATA_DIR" status >/dev/null 2>&1; then
                tail -n 20 "$PG_LOG" >&2 || true
                REASON="the standby is not running: see $PG_LOG"
                return
            fi
        fi
        if [ -z "$host" ] && [ -f "$PGDATA_DIR/postmaster.pid" ]; then
            host=$(sed -n 5p "$PGDATA_DIR/postmaster.pid")
            if [ -z "$host" ]; then
                host=$(sed -n 6p "$PGDATA_DIR/postmaster.pid")
                [ "$host" != "*" ] || host=localhost
            fi
        fi
        if [ -n "$host" ] && as_pg "$PG_BIN/pg_isready" -q -h "$host" -p "$PORT" >/dev/null 2>&1; then
            if out=$(standby_psql "SELECT pg_is_in_recovery()"); then
                if [ "$out" = t ]; then READY=true; return; fi
                if [ "$out" = f ]; then
                    REASON="the server on port $PORT is up but not in recovery: it is not a standby"
                    return
                fi
            elif login_refused "$out"; then
                REASON="the standby is up and accepts connections on port $PORT, but the check could not log in as role '$DB_USER': ${out//$'\n'/ }. Give the password as for any psql (PGPASSWORD, PGPASSFILE or ~/.pgpass) or another --db-user; check it yourself with: psql -h $host -p $PORT -U $DB_USER -d postgres -c 'SELECT pg_is_in_recovery()'"
                return
            fi
            last_err=$out
        fi
        if [ "$(date +%s)" -ge "$deadline" ]; then
            [ -z "$last_err" ] || printf 'last psql error: %s\n' "$last_err" >&2
            tail -n 20 "$PG_LOG" >&2 || true
            REASON="the standby did not accept read-only queries within ${TIMEOUT}s (it is still running; see $PG_LOG)"
            return
        fi
        sleep 1
    done
}

say "starting the standby: pg_ctl -D $PGDATA_DIR -l $PG_LOG start"
# -W: we wait ourselves, with our own timeout and a check that the server is alive.
if as_pg "$PG_BIN/pg_ctl" -D "$PGDATA_DIR" -l "$PG_LOG" -W start >/dev/null; then
    wait_ready
else
    REASON="pg_ctl start failed: see $PG_LOG"
fi

feed="restore_command from $WAL_DIR"
$READY || feed="not checked"
if $READY && [ "$FEED" = stream ]; then
    feed="restore_command (not streaming yet: see $FOLLOW_LOG)"
    for _ in $(seq 20); do
        st=$(standby_psql "SELECT status FROM pg_stat_wal_receiver" 2>/dev/null || true)
        if [ "$st" = streaming ]; then feed="streaming from wal-receiver ($WAL_DIR/.s.PGSQL.5432)"; break; fi
        sleep 0.5
    done
fi

# The summary, whether or not the standby was confirmed ready: what runs, and how to stop
# and restart it.
trap - EXIT
if $READY; then
    headline="the standby is up and in recovery"
else
    headline="the standby was started, but is not confirmed ready (reason below)"
fi
[ -n "$host" ] || host=${SOCKET_DIR:-"(its unix_socket_directories)"}
follow_state="pid $FPID"
kill -0 "$FPID" 2>/dev/null || follow_state="NOT RUNNING (was pid $FPID)"
standby_state="running"
as_pg "$PG_BIN/pg_ctl" -D "$PGDATA_DIR" status >/dev/null 2>&1 || standby_state="NOT RUNNING"
follow_cmd=$(printf '%q ' "$RECEIVER" follow "${SENDER_ARGS[@]}" --name "$NAME" --wal-dir "$WAL_DIR" \
    "${TLS_ARGS[@]+"${TLS_ARGS[@]}"}" "${SERVE_ARGS[@]+"${SERVE_ARGS[@]}"}")
cat <<EOF
==> $headline

  standby:               $PGDATA_DIR ($standby_state), port $PORT, socket directory $host
                         log $PG_LOG
                         connect: psql -h $host -p $PORT -U $DB_USER postgres
  wal-receiver follow:   $follow_state (in $FOLLOW_PID), receiver '$NAME' of $SENDER
                         log $FOLLOW_LOG
  WAL store:             $WAL_DIR   ($RECEIVER status --wal-dir $WAL_DIR)
  WAL feed:              $feed

To stop it:
  ${AS_PG}$PG_BIN/pg_ctl -D $PGDATA_DIR stop
  kill \$(cat $FOLLOW_PID)        # SIGTERM: wal-receiver flushes and exits
To start the standby again (its port is in its postgresql.auto.conf):
  ${AS_PG}$PG_BIN/pg_ctl -D $PGDATA_DIR -l $PG_LOG start
To start the receiver again (it resumes where it stopped):
  nohup ${AS_PG}${follow_cmd}>>$FOLLOW_LOG 2>&1 &
EOF
$READY || die "$REASON"
