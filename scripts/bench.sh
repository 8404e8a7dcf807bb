#!/usr/bin/env bash
# Benchmarks: walship vs PostgreSQL's own tools on the same primary in the same run.
#
# Bootstrap: `wal-receiver bootstrap` vs `pg_basebackup -Fp -Xstream -c fast` on the quiet
# primary: wall time until the target could start as a standby, client CPU, wal-sender CPU,
# bytes on the wire.
#
# Streaming: walship vs pg_receivewal --synchronous, plus a baseline with no shipping.
# Optional setups pg_receivewal_relay and pg_receivewal_relay_sync run pg_receivewal through
# a plain byte relay (socat: TCP on loopback to the primary's socket), the shape of walship's
# path without its work: what any relay process next to the primary costs. The relay's CPU
# is reported where walship's sender's is.
#
# For each setup it runs `pgbench -c 4 -T $BENCH_SECONDS` and reports:
#   - primary TPS;
#   - how far the receiver's acknowledged flush position trails the primary's flush, as
#     PostgreSQL measures it (pg_stat_replication.flush_lag), p50 and p99, sampled every 100 ms;
#   - the same in bytes (pg_current_wal_flush_lsn() - flush_lsn), p50 and p99;
#   - raw WAL bytes and bytes on the wire (walship only: pg_receivewal sends WAL uncompressed).
# Setups alternate and repeat $BENCH_RUNS times; medians are reported. Raw numbers go to
# $BENCH_OUT (JSON). Timing is measured here, never asserted in tests.
#
# Replay: how long a commit on the primary takes to become visible on a standby, under
# `pgbench -c 4 -T $BENCH_SECONDS`, for three feeds of the same standby: PostgreSQL's native
# streaming replication (pg_basebackup -R), walship's restore_command feed, and walship's
# streaming feed (follow --serve-standby). Sampled every 100 ms on the standby, in one
# session, as clock_timestamp() - pg_last_xact_replay_timestamp(): the age of the newest
# replayed commit, which under a steady load is the commit-to-visible lag. p50 and p99,
# and primary TPS.
# BENCH_REPLAY_RATE=N runs pgbench at N transactions per second (-R) instead of flat out,
# which leaves the cores some idle time. The metric then also includes the wait for the
# next commit, the same for every feed.
# BENCH_REPLAY_SPLIT=1 splits the two cores as two hosts would: the primary, pgbench and
# wal-sender run on CPU 0, the standby and wal-receiver (for native, the standby alone) on
# CPU 1, through taskset.
#
# Restore: a scale-$BENCH_SCALE base backup plus $BENCH_RESTORE_SECONDS s of pgbench WAL after
# it, restored until the server runs (recovery ended): `wal-receiver restore` from a backup
# repository vs pg_basebackup's plain copy (cp -a) plus replay from a pg_receivewal directory
# (restore_command = cp), and `pgbackrest restore` when Debian's pgbackrest can be installed.
#
# Environment: BENCH_PARTS ("bootstrap streaming replay catchup restore"), BENCH_SCALE (pgbench scale, default 50), BENCH_SECONDS (default 60),
# BENCH_RUNS (default 3), BENCH_OUT (default bench-results.json), BENCH_SETUPS (default
# "none pg_receivewal walship pg_receivewal_sync walship_sync"; pg_receivewal_relay and
# pg_receivewal_relay_sync add the relay baseline), BENCH_ZSTD_LEVEL (the sender's --zstd-level, default 1),
# BENCH_KEEP=1 keeps the temporary directory.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PG_BIN=/usr/lib/postgresql/15/bin
SCALE=${BENCH_SCALE:-50}
SECONDS_PER_RUN=${BENCH_SECONDS:-60}
RUNS=${BENCH_RUNS:-3}
OUT=${BENCH_OUT:-bench-results.json}

say() { printf '==> %s\n' "$*" >&2; }
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

cargo build --release --bins -q
BIN=$(mktemp -d)
cp target/release/wal-sender target/release/wal-receiver "$BIN/"
chmod 755 "$BIN" "$BIN"/*

WORK=$(mktemp -d /tmp/walship-bench.XXXXXX)
chmod 755 "$WORK"
[ "$(id -u)" = 0 ] && chown postgres "$WORK"
PIDS=()
cleanup() {
    for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
    # A process started as `as_pg ... &` is a subshell's child: the PIDS entry is the
    # subshell, so kill the processes themselves too (this run's own binaries, and
    # pg_receivewal writing into this run's directory).
    pkill -f -- "$BIN/wal-" 2>/dev/null || true
    pkill -f -- "pg_receivewal .*$WORK/" 2>/dev/null || true
    as_pg "$PG_BIN/pg_ctl" -D "$WORK/primary" stop -m immediate >/dev/null 2>&1 || true
    ip netns del "walship_bench_$$" 2>/dev/null || true
    if [ -z "${BENCH_KEEP:-}" ]; then rm -rf "$WORK" "$BIN"; else say "kept $WORK"; fi
}
trap cleanup EXIT

say "primary: initdb, pgbench -i -s $SCALE"
as_pg mkdir -p "$WORK/sock"
as_pg "$PG_BIN/initdb" -D "$WORK/primary" -A trust -U postgres >/dev/null
cat >> "$WORK/primary/postgresql.conf" <<EOF
listen_addresses = ''
unix_socket_directories = '$WORK/sock'
port = 5432
wal_level = replica
max_wal_senders = 10
max_replication_slots = 10
max_wal_size = 4GB
shared_buffers = 256MB
EOF
as_pg "$PG_BIN/pg_ctl" -D "$WORK/primary" -l "$WORK/primary.log" -w start >/dev/null
CONN="host=$WORK/sock port=5432 user=postgres dbname=postgres"
psql_() { "$PG_BIN/psql" -XAtq -d "$CONN" -c "$1"; }
"$PG_BIN/pgbench" -i -q -s "$SCALE" "$CONN" >/dev/null 2>&1

SENDER_PORT=$(( 20000 + RANDOM % 20000 ))
# NSX prefixes the sender (and the primary) with `ip netns exec` while a link is shaped.
NSX=()
NS="walship_bench_$$"
SENDER_LOG="$WORK/sender.log"
# CPU_P and CPU_S pin the primary's side and the standby's side in the replay part
# (restart_primary and start_sender apply CPU_P).
CPU_P=(); CPU_S=()
start_sender() {  # log
    SENDER_LOG=$1
    "${NSX[@]}" "${CPU_P[@]}" "$BIN/wal-sender" serve --pg-conn "$CONN" --listen "127.0.0.1:$SENDER_PORT" --zstd-level="${BENCH_ZSTD_LEVEL:-1}" ${BENCH_BATCH_DELAY:+--batch-delay=$BENCH_BATCH_DELAY} > "$SENDER_LOG" 2>&1 &
    SENDER_PID=$!; PIDS+=("$SENDER_PID")
    sleep 1
    # A sender that did not start (a bad option, a busy port) would leave every run waiting.
    kill -0 "$SENDER_PID" 2>/dev/null || { cat "$SENDER_LOG" >&2; say "wal-sender did not start"; exit 1; }
}
start_sender "$WORK/sender.log"
PARTS=${BENCH_PARTS:-bootstrap streaming replay catchup restore}

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
TICKS=$(getconf CLK_TCK)

# ---------------------------------------------------------------------------------------
# Bootstrap: wal-receiver bootstrap vs pg_basebackup -Fp -Xstream -c fast, on a quiet primary.
# Wall time until the target is a standby that can start; CPU of the client (and of
# wal-sender for walship); bytes on the wire.
# ---------------------------------------------------------------------------------------
boot_one() {  # tool run link -> JSON
    local tool=$1 run=$2 link=$3 target="$WORK/boot-$1-$2" timing="$WORK/boot-$1-$2.time" wire=null sender_cpu=null
    local before; before=$(cpu_ticks "$SENDER_PID")
    local TIMEFORMAT='%R %U %S'
    local pgconn=$CONN
    [ "$link" = loopback ] || pgconn="host=127.0.0.1 port=5432 user=postgres dbname=postgres"
    case $tool in
        walship)
            { time "${NSX[@]}" "${AS_PG[@]}" "$BIN/wal-receiver" bootstrap --sender "127.0.0.1:$SENDER_PORT" --name "boot_$run" \
                --pgdata "$target" --wal-dir "$target.wal" > "$target.log" 2>&1 ; } 2> "$timing"
            sender_cpu=$(awk -v a="$before" -v b="$(cpu_ticks "$SENDER_PID")" -v t="$TICKS" 'BEGIN {printf "%.2f", (b - a) / t}')
            wire=$(grep "backup sent" "$SENDER_LOG" | tail -1 | sed -E 's/.*wire_bytes=([0-9]+).*/\1/')
            ;;
        pg_basebackup)
            { time "${NSX[@]}" "${AS_PG[@]}" "$PG_BIN/pg_basebackup" -d "$pgconn" -D "$target" -Fp -Xstream -c fast > "$target.log" 2>&1 ; } 2> "$timing"
            ;;
    esac
    local bytes; bytes=$(du -sb "$target" | cut -f1)
    read -r wall user sys < "$timing"
    psql_ "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = 'walship_boot_$run'" >/dev/null || true
    rm -rf "$target" "$target.wal"
    printf '{"tool":"%s","link":"%s","run":%s,"wall_s":%s,"client_cpu_s":%s,"sender_cpu_s":%s,"data_bytes":%s,"wire_bytes":%s}\n' \
        "$tool" "$link" "$run" "$wall" "$(awk -v u="$user" -v s="$sys" 'BEGIN {print u + s}')" "$sender_cpu" "$bytes" "${wire:-null}"
}

AS_PG=(); [ "$(id -u)" = 0 ] && AS_PG=(runuser -u postgres --)
restart_primary() {  # extra postgres options
    kill "$SENDER_PID" 2>/dev/null; wait "$SENDER_PID" 2>/dev/null || true
    as_pg "$PG_BIN/pg_ctl" -D "$WORK/primary" -w stop -m fast >/dev/null
    "${NSX[@]}" "${AS_PG[@]}" "${CPU_P[@]}" "$PG_BIN/pg_ctl" -D "$WORK/primary" -l "$WORK/primary.log" -w start -o "$1" >/dev/null
}
# Shapes a network namespace's loopback to RATE and runs the primary, the sender and both
# clients inside it. netem (rate and 1 ms delay) when the kernel has it, else tbf (rate only).
shape() {  # rate
    ip netns add "$NS" && ip netns exec "$NS" ip link set lo up
    if ip netns exec "$NS" tc qdisc add dev lo root netem rate "$1" delay 1ms 2>/dev/null; then
        SHAPE="netem rate $1 delay 1ms"
    else
        ip netns exec "$NS" tc qdisc add dev lo root tbf rate "$1" burst 1mb latency 100ms
        SHAPE="tbf rate $1 (this kernel has no netem: no added delay)"
    fi
    NSX=(ip netns exec "$NS")
    restart_primary "-c listen_addresses=127.0.0.1"
    start_sender "$WORK/sender-$1.log"
}
unshape() {
    restart_primary "-c listen_addresses=''"
    NSX=()
    ip netns del "$NS" 2>/dev/null || true
    start_sender "$WORK/sender.log"
}

BOOT="$WORK/bootstrap.jsonl"
: > "$BOOT"
read -r -a LINKS <<< "${BENCH_LINKS:-loopback 1gbit 100mbit}"
if [[ " $PARTS " == *" bootstrap "* ]]; then
    for link in "${LINKS[@]}"; do
        SHAPE=loopback
        if [ "$link" != loopback ]; then
            if [ "$(id -u)" != 0 ]; then say "skipping the $link bootstrap: shaping a network namespace needs root"; continue; fi
            shape "$link"
        fi
        for run in $(seq "$RUNS"); do
            order=(pg_basebackup walship)
            (( run % 2 == 0 )) && order=(walship pg_basebackup)
            for tool in "${order[@]}"; do
                say "bootstrap run $run/$RUNS over $SHAPE: $tool"
                boot_one "$tool" "$run" "$link" | tee -a "$BOOT" >&2
            done
        done
        [ "$link" = loopback ] || unshape
    done
fi

# percentile P of the numbers in file F (nearest rank)
# (Empty lines, such as a sample taken before the standby replayed any commit, are skipped.)
pct() { sort -g "$2" | awk -v p="$1" 'NF {a[++n]=$1} END {if (n==0) {print "null"; exit} i=int(n*p/100+0.999); if (i<1) i=1; print a[i]}'; }

# sample APP OUTFILE: every 100 ms, flush lag in ms and in bytes, until killed
sample() {
    local app=$1 out=$2
    while true; do
        psql_ "SELECT coalesce(extract(epoch FROM flush_lag) * 1000, 0)::numeric(12,3), pg_current_wal_flush_lsn() - flush_lsn, extract(epoch FROM clock_timestamp()) FROM pg_stat_replication WHERE application_name = '$app'" >> "$out" || true
        sleep 0.1
    done
}

run_one() {  # setup run -> prints a JSON object
    local setup=$1 run=$2 app="bench_${1}_$2" dir="$WORK/$1-$2" recv_pid="" sampler="" relay_pid=""
    mkdir -p "$dir"
    case $setup in
        walship|walship_sync)
            RUST_LOG=${BENCH_RECEIVER_LOG:-info} "$BIN/wal-receiver" follow --sender "127.0.0.1:$SENDER_PORT" --name "$app" --wal-dir "$dir/wal" > "$dir/receiver.log" 2>&1 &
            recv_pid=$!
            ;;
        pg_receivewal|pg_receivewal_sync|pg_receivewal_relay|pg_receivewal_relay_sync)
            psql_ "SELECT pg_create_physical_replication_slot('$app', true)" >/dev/null
            local conn=$CONN
            if [[ $setup == pg_receivewal_relay* ]]; then
                # One connection, relayed byte for byte; nodelay as libpq sets it.
                local port=$(( 20000 + RANDOM % 20000 ))
                socat "TCP-LISTEN:$port,bind=127.0.0.1,reuseaddr,nodelay" "UNIX-CONNECT:$WORK/sock/.s.PGSQL.5432" > "$dir/relay.log" 2>&1 &
                relay_pid=$!; PIDS+=("$relay_pid")
                for _ in $(seq 50); do ss -Hltn "sport = :$port" | grep -q . && break; sleep 0.1; done
                conn="host=127.0.0.1 port=$port user=postgres dbname=postgres"
            fi
            "$PG_BIN/pg_receivewal" -d "$conn application_name=$app" -S "$app" --synchronous -D "$dir" -n > "$dir/receiver.log" 2>&1 &
            recv_pid=$!
            ;;
    esac
    [[ $setup == walship* ]] && relay_pid=$SENDER_PID
    if [ -n "$recv_pid" ]; then
        PIDS+=("$recv_pid")
        for _ in $(seq 100); do
            [ -n "$(psql_ "SELECT 1 FROM pg_stat_replication WHERE application_name = '$app'")" ] && break
            sleep 0.1
        done
        # Let the receiver catch up with what existed before the load, so only the load is measured.
        for _ in $(seq 600); do
            [ "$(psql_ "SELECT coalesce(flush_lsn >= pg_current_wal_flush_lsn(), false) FROM pg_stat_replication WHERE application_name = '$app'")" = t ] && break
            sleep 0.1
        done
    fi
    if [[ $setup == *_sync ]]; then
        psql_ "ALTER SYSTEM SET synchronous_standby_names = '$app'" >/dev/null
        psql_ "SELECT pg_reload_conf()" >/dev/null
        for _ in $(seq 100); do
            [ "$(psql_ "SELECT sync_state FROM pg_stat_replication WHERE application_name = '$app'")" = sync ] && break
            sleep 0.1
        done
    fi
    # Every run starts right after a checkpoint, as on a primary in steady state: the first
    # change to each page after it is a full-page image. Without it, a freshly loaded
    # database writes no full-page images at all until its first checkpoint.
    psql_ "CHECKPOINT" >/dev/null
    local wal_start; wal_start=$(psql_ "SELECT pg_current_wal_flush_lsn()")
    local tps latency
    # Sampled only while the load runs: pg_stat_replication keeps the last lag it measured,
    # so samples taken before would repeat the catch-up's.
    [ -n "$recv_pid" ] && { sample "$app" "$dir/samples" & sampler=$!; }
    # CPU seconds of the receiver and of the relay (wal-sender, or socat) during the load.
    local r0=0 s0=0
    [ -n "$relay_pid" ] && s0=$(cpu_ticks "$relay_pid")
    [ -n "$recv_pid" ] && r0=$(cpu_ticks "$recv_pid")
    "$PG_BIN/pgbench" -n -c 4 -j 2 -T "$SECONDS_PER_RUN" "$CONN" > "$dir/pgbench.out" 2>/dev/null || true
    local recv_cpu=null sender_cpu=null
    [ -n "$recv_pid" ] && recv_cpu=$(awk -v a="$r0" -v b="$(cpu_ticks "$recv_pid")" -v t="$TICKS" 'BEGIN {printf "%.2f", (b - a) / t}')
    [ -n "$relay_pid" ] && sender_cpu=$(awk -v a="$s0" -v b="$(cpu_ticks "$relay_pid")" -v t="$TICKS" 'BEGIN {printf "%.2f", (b - a) / t}')
    tps=$(awk '/^tps/ {print $3; exit}' "$dir/pgbench.out")
    latency=$(awk '/^latency average/ {print $4; exit}' "$dir/pgbench.out")
    if [[ $setup == *_sync ]]; then
        psql_ "ALTER SYSTEM RESET synchronous_standby_names" >/dev/null
        psql_ "SELECT pg_reload_conf()" >/dev/null
    fi
    local wal_bytes; wal_bytes=$(psql_ "SELECT pg_current_wal_flush_lsn() - '$wal_start'")
    [ -n "$sampler" ] && kill "$sampler" 2>/dev/null && wait "$sampler" 2>/dev/null || true
    local lag_ms_p50=null lag_ms_p99=null lag_b_p50=null lag_b_p99=null raw=null wire=null
    if [ -n "$recv_pid" ]; then
        cut -d'|' -f1 "$dir/samples" > "$dir/ms"; cut -d'|' -f2 "$dir/samples" > "$dir/bytes"
        lag_ms_p50=$(pct 50 "$dir/ms"); lag_ms_p99=$(pct 99 "$dir/ms")
        lag_b_p50=$(pct 50 "$dir/bytes"); lag_b_p99=$(pct 99 "$dir/bytes")
        kill "$recv_pid" 2>/dev/null; wait "$recv_pid" 2>/dev/null || true
        [[ $setup == pg_receivewal_relay* ]] && { kill "$relay_pid" 2>/dev/null; wait "$relay_pid" 2>/dev/null || true; }
        if [[ $setup == walship* ]]; then
            local st; st=$("$BIN/wal-receiver" status --json --wal-dir "$dir/wal")
            raw=$(printf '%s' "$st" | sed -E 's/.*"raw_bytes":([0-9]+).*/\1/')
            wire=$(printf '%s' "$st" | sed -E 's/.*"wire_bytes":([0-9]+).*/\1/')
        fi
        psql_ "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name IN ('$app', 'walship_$app')" >/dev/null || true
    fi
    [ -n "${BENCH_KEEP:-}" ] || rm -rf "$dir/wal" "$dir"/0* 2>/dev/null || true
    printf '{"setup":"%s","run":%s,"tps":%s,"latency_ms":%s,"wal_bytes":%s,"flush_lag_ms_p50":%s,"flush_lag_ms_p99":%s,"flush_lag_bytes_p50":%s,"flush_lag_bytes_p99":%s,"raw_bytes":%s,"wire_bytes":%s,"receiver_cpu_s":%s,"sender_cpu_s":%s}\n' \
        "$setup" "$run" "${tps:-null}" "${latency:-null}" "$wal_bytes" "$lag_ms_p50" "$lag_ms_p99" "$lag_b_p50" "$lag_b_p99" "$raw" "$wire" "$recv_cpu" "$sender_cpu"
}

RESULTS="$WORK/results.jsonl"
: > "$RESULTS"
read -r -a SETUPS <<< "${BENCH_SETUPS:-none pg_receivewal walship pg_receivewal_sync walship_sync}"
[[ " $PARTS " == *" streaming "* ]] || SETUPS=()
if [[ " ${SETUPS[*]} " == *" pg_receivewal_relay"* ]] && ! command -v socat >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
        say "streaming: installing socat for the relay baseline"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq socat >/dev/null 2>&1 || true
    fi
    if ! command -v socat >/dev/null 2>&1; then
        say "streaming: no socat (installing it needs root): skipping the relay baseline"
        kept=(); for s in "${SETUPS[@]}"; do [[ $s == pg_receivewal_relay* ]] || kept+=("$s"); done
        SETUPS=("${kept[@]}")
    fi
fi
for run in $(seq "$RUNS"); do
    (( ${#SETUPS[@]} )) || break
    # Alternate the order between runs so no setup always runs on a warmer cache.
    order=("${SETUPS[@]}")
    if (( run % 2 == 0 )); then
        order=(); for (( i = ${#SETUPS[@]} - 1; i >= 0; i-- )); do order+=("${SETUPS[$i]}"); done
    fi
    for setup in "${order[@]}"; do
        say "run $run/$RUNS: $setup, pgbench -c 4 -T $SECONDS_PER_RUN"
        run_one "$setup" "$run" | tee -a "$RESULTS" >&2
    done
done

# ---------------------------------------------------------------------------------------
# Replay: commit-to-visible lag on a standby fed three ways.
# ---------------------------------------------------------------------------------------
REPLAY_PORT=5499
SCONN="host=$WORK/sock port=$REPLAY_PORT user=postgres dbname=postgres"
replay_one() {  # feed run -> JSON
    local feed=$1 run=$2 app="replay_${1}_$2" dir="$WORK/replay-$1-$2" sampler="" feeder=""
    as_pg mkdir -p "$dir"
    case $feed in
        native)
            as_pg "${CPU_S[@]}" "$PG_BIN/pg_basebackup" -d "$CONN application_name=$app" -D "$dir/standby" -Fp -Xstream -c fast -R \
                > "$dir/bootstrap.log" 2>&1
            ;;
        restore_command|walship)
            local how=stream serve=()
            if [ "$feed" = restore_command ]; then how=restore-command; else serve=(--serve-standby "$dir/wal"); fi
            as_pg "${CPU_S[@]}" "$BIN/wal-receiver" bootstrap --sender "127.0.0.1:$SENDER_PORT" --name "$app" \
                --pgdata "$dir/standby" --wal-dir "$dir/wal" --standby-feed "$how" > "$dir/bootstrap.log" 2>&1
            as_pg "${CPU_S[@]}" "$BIN/wal-receiver" follow --sender "127.0.0.1:$SENDER_PORT" --name "$app" --wal-dir "$dir/wal" \
                "${serve[@]}" > "$dir/follow.log" 2>&1 &
            PIDS+=("$!")
            ;;
    esac
    as_pg "${CPU_S[@]}" "$PG_BIN/pg_ctl" -D "$dir/standby" -l "$dir/standby.log" -w -t 300 start \
        -o "-p $REPLAY_PORT -c listen_addresses='' -c unix_socket_directories='$WORK/sock'" >/dev/null
    local target; target=$(psql_ "SELECT pg_current_wal_flush_lsn()")
    for _ in $(seq 1200); do
        [ "$("$PG_BIN/psql" -XAtq -d "$SCONN" -c "SELECT coalesce(pg_last_wal_replay_lsn() >= '$target', false)" 2>/dev/null)" = t ] && break
        sleep 0.1
    done
    # Every feed's load starts right after a checkpoint, as in the streaming part.
    psql_ "CHECKPOINT" >/dev/null
    # One session samples throughout: a new connection per sample would start a backend on
    # the standby every 100 ms, and the lag measured would include the replay that start
    # delays. The feeder ends, psql reads end of input and exits, writing what it buffered.
    mkfifo "$dir/sampler.fifo"
    "${CPU_S[@]}" "$PG_BIN/psql" -XAtq -d "$SCONN" < "$dir/sampler.fifo" >> "$dir/lag" 2>/dev/null & sampler=$!
    ( while echo "SELECT (extract(epoch FROM clock_timestamp() - pg_last_xact_replay_timestamp()) * 1000)::numeric(12,3);"; do
        sleep 0.1
    done > "$dir/sampler.fifo" ) & feeder=$!
    local tps
    tps=$("${CPU_P[@]}" "$PG_BIN/pgbench" -n -c 4 -j 2 -T "$SECONDS_PER_RUN" ${REPLAY_RATE:+-R "$REPLAY_RATE"} "$CONN" 2>/dev/null | awk '/^tps/ {print $3; exit}')
    kill "$feeder" 2>/dev/null; wait "$feeder" 2>/dev/null || true
    wait "$sampler" 2>/dev/null || true
    local p50 p99; p50=$(pct 50 "$dir/lag"); p99=$(pct 99 "$dir/lag")
    as_pg "$PG_BIN/pg_ctl" -D "$dir/standby" stop -m immediate >/dev/null 2>&1 || true
    pkill -f -- "--wal-dir $dir/wal" 2>/dev/null || true
    sleep 0.5
    psql_ "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = 'walship_$app'" >/dev/null || true
    [ -n "${BENCH_KEEP:-}" ] || rm -rf "$dir"
    printf '{"feed":"%s","run":%s,"tps":%s,"visible_lag_ms_p50":%s,"visible_lag_ms_p99":%s}\n' \
        "$feed" "$run" "${tps:-null}" "$p50" "$p99"
}

REPLAY="$WORK/replay.jsonl"
: > "$REPLAY"
REPLAY_RATE=${BENCH_REPLAY_RATE:-}
REPLAY_LOAD="pgbench -c 4 -T $SECONDS_PER_RUN${REPLAY_RATE:+ -R $REPLAY_RATE}${BENCH_REPLAY_SPLIT:+, cores split}"
# Restarts the primary and the sender with the affinity in CPU_P.
repin_primary() {
    restart_primary "-c listen_addresses=''"
    start_sender "$WORK/sender.log"
}
if [[ " $PARTS " == *" replay "* ]]; then
    if [ -n "${BENCH_REPLAY_SPLIT:-}" ]; then
        [ "$(nproc)" -ge 2 ] || { say "BENCH_REPLAY_SPLIT needs two CPUs"; exit 1; }
        CPU_P=(taskset -c 0); CPU_S=(taskset -c 1)
        say "replay: primary, pgbench and wal-sender on CPU 0; standby and wal-receiver on CPU 1"
        repin_primary
    fi
    read -r -a FEEDS <<< "${BENCH_FEEDS:-native restore_command walship}"
    for run in $(seq "$RUNS"); do
        order=("${FEEDS[@]}")
        (( run % 2 == 0 )) && order=(walship restore_command native)
        for feed in "${order[@]}"; do
            say "replay run $run/$RUNS: $feed feed, $REPLAY_LOAD"
            replay_one "$feed" "$run" | tee -a "$REPLAY" >&2
        done
    done
    if [ -n "${BENCH_REPLAY_SPLIT:-}" ]; then
        CPU_P=(); CPU_S=()
        repin_primary
    fi
fi

# ---------------------------------------------------------------------------------------
# Catch-up: a receiver is stopped, about $BENCH_CATCHUP_MB MB of WAL is written (pgbench -i
# into a database of its own), and the receiver starts again. Time until its flushed
# position reaches the primary's, the rate, and for walship the peak RSS and CPU seconds per
# GB of WAL of the sender and the receiver. pg_receivewal runs in its default mode (it
# fsyncs at segment end), the fastest way it catches up, and is timed to its written
# position; walship is timed to its fsynced, acknowledged position.
# ---------------------------------------------------------------------------------------
CATCHUP_MB=${BENCH_CATCHUP_MB:-2048}
rss_kb() { awk '/^VmHWM/ {print $2}' "/proc/$1/status" 2>/dev/null || echo null; }
catchup_one() {  # tool run -> JSON
    local tool=$1 run=$2 app="catchup_${1}_$2" dir="$WORK/catchup-$1-$2" pid=""
    mkdir -p "$dir"
    # A sender of its own, so that its peak RSS and CPU are this catch-up's. (This runs in
    # a pipeline's subshell: everything it starts, it stops.)
    local port=$(( SENDER_PORT + 1 )) spid
    "$BIN/wal-sender" serve --pg-conn "$CONN" --listen "127.0.0.1:$port" --zstd-level "${BENCH_ZSTD_LEVEL:-1}" > "$dir/sender.log" 2>&1 &
    spid=$!
    sleep 0.5
    start_receiver() {
        case $tool in
            walship)
                "$BIN/wal-receiver" follow --sender "127.0.0.1:$port" --name "$app" --wal-dir "$dir/wal" > "$dir/receiver.log" 2>&1 & ;;
            pg_receivewal)
                "$PG_BIN/pg_receivewal" -d "$CONN application_name=$app" -S "$app" -D "$dir/wal" -n > "$dir/receiver.log" 2>&1 & ;;
        esac
        pid=$!
    }
    # walship: its acknowledged (fsynced) position. pg_receivewal in its default mode
    # fsyncs only at segment end, so its written position is what it has received.
    local col=flush_lsn; [ "$tool" = pg_receivewal ] && col=write_lsn
    flushed() { psql_ "SELECT coalesce((SELECT $col >= '$1'::pg_lsn FROM pg_stat_replication WHERE application_name = '$app'), false)"; }
    mkdir -p "$dir/wal"
    [ "$tool" = pg_receivewal ] && psql_ "SELECT pg_create_physical_replication_slot('$app', true)" >/dev/null
    start_receiver
    local now; now=$(psql_ "SELECT pg_current_wal_flush_lsn()")
    for _ in $(seq 600); do [ "$(flushed "$now")" = t ] && break; sleep 0.1; done
    kill "$pid"; wait "$pid" 2>/dev/null || true
    local from; from=$(psql_ "SELECT pg_current_wal_flush_lsn()")
    psql_ "DROP DATABASE IF EXISTS catchup" >/dev/null; psql_ "CREATE DATABASE catchup" >/dev/null
    "$PG_BIN/pgbench" -i -q -s "$(( CATCHUP_MB / 16 ))" "host=$WORK/sock port=5432 user=postgres dbname=catchup" >/dev/null 2>&1
    local target; target=$(psql_ "SELECT pg_current_wal_flush_lsn()")
    local backlog; backlog=$(psql_ "SELECT '$target'::pg_lsn - '$from'::pg_lsn")
    local s0 t0; s0=$(cpu_ticks "$spid"); t0=$(date +%s.%N)
    start_receiver
    until [ "$(flushed "$target")" = t ]; do sleep 0.1; done
    local t1; t1=$(date +%s.%N)
    local s1 r1; s1=$(cpu_ticks "$spid"); r1=$(cpu_ticks "$pid")
    local srss rrss; srss=$(rss_kb "$spid"); rrss=$(rss_kb "$pid")
    kill "$pid" "$spid" 2>/dev/null || true
    wait "$pid" "$spid" 2>/dev/null || true
    psql_ "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name IN ('$app', 'walship_$app')" >/dev/null || true
    psql_ "DROP DATABASE IF EXISTS catchup" >/dev/null
    [ -n "${BENCH_KEEP:-}" ] || rm -rf "$dir/wal"
    local secs; secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.2f", b - a}')
    local gb; gb=$(awk -v b="$backlog" 'BEGIN {print b / 1073741824}')
    local sender_cpu=null
    [ "$tool" = walship ] && sender_cpu=$(awk -v a="$s0" -v b="$s1" -v t="$TICKS" -v g="$gb" 'BEGIN {printf "%.2f", (b - a) / t / g}')
    [ "$tool" = walship ] || srss=null
    printf '{"tool":"%s","run":%s,"backlog_bytes":%s,"seconds":%s,"mb_per_s":%s,"receiver_cpu_s_per_gb":%s,"sender_cpu_s_per_gb":%s,"receiver_peak_rss_kb":%s,"sender_peak_rss_kb":%s}\n' \
        "$tool" "$run" "$backlog" "$secs" "$(awk -v b="$backlog" -v s="$secs" 'BEGIN {printf "%.1f", b / 1048576 / s}')" \
        "$(awk -v r="$r1" -v t="$TICKS" -v g="$gb" 'BEGIN {printf "%.2f", r / t / g}')" "$sender_cpu" "$rrss" "$srss"
}

CATCHUP="$WORK/catchup.jsonl"
: > "$CATCHUP"
if [[ " $PARTS " == *" catchup "* ]]; then
    for run in $(seq "$RUNS"); do
        order=(pg_receivewal walship)
        (( run % 2 == 0 )) && order=(walship pg_receivewal)
        for tool in "${order[@]}"; do
            say "catch-up run $run/$RUNS: $tool, about $CATCHUP_MB MB of WAL behind"
            catchup_one "$tool" "$run" | tee -a "$CATCHUP" >&2
        done
    done
fi

# ---------------------------------------------------------------------------------------
# Restore: the same base backup and WAL, restored three ways, timed until the restored
# server has finished recovery and accepts writes.
# ---------------------------------------------------------------------------------------
RESTORE="$WORK/restore.jsonl"
: > "$RESTORE"
RESTORE_SECONDS=${BENCH_RESTORE_SECONDS:-30}
restore_one() {  # tool run -> JSON
    local tool=$1 run=$2 d="$WORK/restored-$1-$2" sock="$WORK/restored-sock"
    as_pg mkdir -p "$sock"
    # Start every run with no dirty pages left by the one before (or by the set-up).
    sync
    local t0 t1; t0=$(date +%s.%N)
    case $tool in
        walship)
            as_pg "$BIN/wal-receiver" restore --repo "$WORK/repo" --pgdata "$d" >/dev/null ;;
        pg_basebackup)
            as_pg cp -a "$WORK/pgbb" "$d"
            as_pg touch "$d/recovery.signal"
            printf "restore_command = 'cp %s/%%f %%p'\n" "$WORK/pgrw" | as_pg tee -a "$d/postgresql.auto.conf" >/dev/null ;;
        pgbackrest)
            as_pg mkdir -m 700 "$d"
            as_pg pgbackrest --config="$WORK/pgbackrest.conf" --stanza=bench --pg1-path="$d" restore >/dev/null ;;
    esac
    local tm; tm=$(date +%s.%N)
    as_pg "$PG_BIN/pg_ctl" -D "$d" -l "$d.log" -w -t 600 start \
        -o "-c unix_socket_directories='$sock' -c port=5433 -c listen_addresses='' -c archive_mode=off" >/dev/null
    until [ "$("$PG_BIN/psql" -XAtq -d "host=$sock port=5433 user=postgres dbname=postgres" -c 'SELECT pg_is_in_recovery()' 2>/dev/null)" = f ]; do
        sleep 0.05
    done
    t1=$(date +%s.%N)
    as_pg "$PG_BIN/pg_ctl" -D "$d" stop -m immediate >/dev/null
    rm -rf "$d"
    printf '{"tool":"%s","run":%s,"seconds":%s,"copy_s":%s,"replay_s":%s}\n' "$tool" "$run" \
        "$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.2f", b - a}')" \
        "$(awk -v a="$t0" -v b="$tm" 'BEGIN {printf "%.2f", b - a}')" \
        "$(awk -v a="$tm" -v b="$t1" 'BEGIN {printf "%.2f", b - a}')"
}
if [[ " $PARTS " == *" restore "* ]]; then
    RESTORE_TOOLS=(pg_basebackup walship)
    if ! command -v pgbackrest >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        say "restore: installing pgbackrest for the comparison"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbackrest >/dev/null 2>&1 || true
    fi
    if command -v pgbackrest >/dev/null 2>&1; then
        say "restore: pgbackrest: archive_command on the primary, stanza, full backup"
        as_pg mkdir -p "$WORK/pgbackrest-repo"
        printf '[global]\nrepo1-path=%s\ncompress-type=zst\nlog-level-console=warn\nlog-path=%s\nlock-path=%s\n[bench]\npg1-path=%s\npg1-socket-path=%s\npg1-port=5432\n' \
            "$WORK/pgbackrest-repo" "$WORK" "$WORK" "$WORK/primary" "$WORK/sock" > "$WORK/pgbackrest.conf"
        chmod 644 "$WORK/pgbackrest.conf"
        printf "archive_mode = on\narchive_command = 'pgbackrest --config=%s --stanza=bench archive-push %%p'\n" \
            "$WORK/pgbackrest.conf" | as_pg tee -a "$WORK/primary/postgresql.conf" >/dev/null
        as_pg "$PG_BIN/pg_ctl" -D "$WORK/primary" -l "$WORK/primary.log" -w restart >/dev/null
        if as_pg pgbackrest --config="$WORK/pgbackrest.conf" --stanza=bench stanza-create >/dev/null \
            && as_pg pgbackrest --config="$WORK/pgbackrest.conf" --stanza=bench --type=full backup >/dev/null; then
            RESTORE_TOOLS+=(pgbackrest)
        else
            say "restore: pgbackrest could not be set up; comparing without it"
        fi
    else
        say "restore: pgbackrest is not installable here; comparing without it"
    fi
    say "restore: walship backup repository (follow + backup), pg_receivewal + pg_basebackup"
    as_pg mkdir -p "$WORK/repo" "$WORK/pgrw"
    as_pg "$BIN/wal-receiver" follow --sender "127.0.0.1:$SENDER_PORT" --name bench_repo --wal-dir "$WORK/repo/wal" > "$WORK/repo-follow.log" 2>&1 &
    PIDS+=("$!")
    psql_ "SELECT pg_create_physical_replication_slot('bench_pgrw', true)" >/dev/null
    as_pg "$PG_BIN/pg_receivewal" -d "$CONN" -S bench_pgrw -D "$WORK/pgrw" -n > "$WORK/pgrw.log" 2>&1 &
    PIDS+=("$!")
    sleep 1
    as_pg "$BIN/wal-receiver" backup --sender "127.0.0.1:$SENDER_PORT" --name bench_repo --repo "$WORK/repo" >/dev/null 2>"$WORK/repo-backup.log"
    as_pg "$PG_BIN/pg_basebackup" -d "$CONN" -D "$WORK/pgbb" -Fp -X none -c fast >/dev/null
    say "restore: pgbench -c 4 -T $RESTORE_SECONDS after the backups"
    "$PG_BIN/pgbench" -n -c 4 -T "$RESTORE_SECONDS" "$CONN" >/dev/null 2>&1
    end=$(psql_ "SELECT pg_current_wal_flush_lsn()")
    last=$(psql_ "SELECT pg_walfile_name(pg_current_wal_flush_lsn())")
    psql_ "SELECT pg_switch_wal()" >/dev/null
    psql_ "SELECT pg_switch_wal()" >/dev/null
    # Every archive holds every segment through the one that held the end of the load.
    until [ -f "$WORK/pgrw/$last" ]; do sleep 0.2; done
    until [ "$(psql_ "SELECT coalesce((SELECT flush_lsn >= '$end'::pg_lsn FROM pg_stat_replication WHERE application_name = 'bench_repo'), false)")" = t ]; do sleep 0.2; done
    if [[ " ${RESTORE_TOOLS[*]} " == *" pgbackrest "* ]]; then
        until as_pg pgbackrest --config="$WORK/pgbackrest.conf" --stanza=bench archive-get "$last" "$WORK/probe-$last" >/dev/null 2>&1; do sleep 0.5; done
    fi
    backup_start=$(as_pg "$BIN/wal-receiver" backups --repo "$WORK/repo" --json | sed -E 's/.*"start_lsn":"([^"]*)".*/\1/')
    wal_mb=$(psql_ "SELECT round(('$end'::pg_lsn - '$backup_start'::pg_lsn) / 1048576)")
    say "restore: $wal_mb MB of WAL to replay after the backup"
    # Let the set-up's background work end before the first run, so that it does not land
    # on whichever tool goes first: the primary's checkpoint, and the repository follower
    # sealing the WAL just written.
    psql_ "CHECKPOINT" >/dev/null
    for _ in $(seq 300); do
        partial=$("$BIN/wal-receiver" status --json --wal-dir "$WORK/repo/wal" | sed -E 's/.*"partial_segments":([0-9]+).*/\1/')
        [ "$partial" -le 1 ] 2>/dev/null && break
        sleep 0.2
    done
    sync
    for run in $(seq "$RUNS"); do
        n=${#RESTORE_TOOLS[@]}
        for i in $(seq 0 $((n - 1))); do
            tool=${RESTORE_TOOLS[$(( (i + run) % n ))]}
            say "restore run $run/$RUNS: $tool"
            restore_one "$tool" "$run" | tee -a "$RESTORE" >&2
        done
    done
fi

# median FILE MATCH FIELD: the median of FIELD over the JSON lines of FILE that contain
# MATCH; "null" when there is none.
median() {
    { grep -F "$2" "$1" || true; } | sed -E "s/.*\"$3\":([^,}]*).*/\1/" | { grep -v null || true; } | sort -g \
        | awk '{a[NR]=$1} END {if (NR==0) print "null"; else if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'
}
# ratio A B: B / A to two decimals, or "-" when either is missing or A is 0.
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "null" || b == "null" || a == 0) print "-"; else printf "%.2f", b / a }'; }
boot_median() { median "$BOOT" "\"tool\":\"$1\",\"link\":\"$3\"" "$2"; }  # tool field link
if [ -s "$BOOT" ]; then
    for link in "${LINKS[@]}"; do
        grep -q "\"link\":\"$link\"" "$BOOT" || continue
        {
            printf '\nBootstrap over %s, pgbench scale %s, median of %s runs\n\n' "$link" "$SCALE" "$RUNS"
            printf '%-16s %16s %16s %14s\n' metric pg_basebackup walship "walship/pgbb"
            for f in wall_s client_cpu_s sender_cpu_s data_bytes wire_bytes; do
                a=$(boot_median pg_basebackup "$f" "$link"); b=$(boot_median walship "$f" "$link")
                ratio=$(ratio "$a" "$b")
                printf '%-16s %16s %16s %14s\n' "$f" "$a" "$b" "$ratio"
            done
        } | tee -a "$WORK/bootstrap-table.txt"
    done
fi

catchup_median() { median "$CATCHUP" "\"tool\":\"$1\"" "$2"; }  # tool field
if [ -s "$CATCHUP" ]; then
    {
        printf '\nCatch-up after an outage, about %s MB of WAL behind, median of %s runs\n\n' "$CATCHUP_MB" "$RUNS"
        printf '%-24s %16s %14s %14s\n' metric pg_receivewal walship "walship/pgrw"
        for f in backlog_bytes seconds mb_per_s receiver_cpu_s_per_gb sender_cpu_s_per_gb receiver_peak_rss_kb sender_peak_rss_kb; do
            a=$(catchup_median pg_receivewal "$f"); b=$(catchup_median walship "$f")
            ratio=$(ratio "$a" "$b")
            printf '%-24s %16s %14s %14s\n' "$f" "$a" "$b" "$ratio"
        done
    } | tee "$WORK/catchup-table.txt"
fi

restore_median() { median "$RESTORE" "\"tool\":\"$1\"" "${2:-seconds}"; }
if [ -s "$RESTORE" ]; then
    {
        printf '\nRestore to a running server, scale %s base backup plus %s s of pgbench WAL (%s MB), median of %s runs\n\n' "$SCALE" "$RESTORE_SECONDS" "${wal_mb:-?}" "$RUNS"
        printf '%-34s %10s %10s %10s %14s\n' tool seconds copy_s replay_s "walship/tool"
        w=$(restore_median walship)
        for t in pg_basebackup pgbackrest walship; do
            a=$(restore_median "$t")
            [ "$a" = null ] && continue
            label=$t; [ "$t" = pg_basebackup ] && label="pg_basebackup + pg_receivewal WAL"
            printf '%-34s %10s %10s %10s %14s\n' "$label" "$a" "$(restore_median "$t" copy_s)" \
                "$(restore_median "$t" replay_s)" "$(ratio "$a" "$w")"
        done
    } | tee "$WORK/restore-table.txt"
fi

replay_median() { median "$REPLAY" "\"feed\":\"$1\"" "$2"; }  # feed field
if [ -s "$REPLAY" ]; then
    {
        printf '\nCommit-to-visible lag on a standby, %s, scale %s, median of %s runs\n\n' "$REPLAY_LOAD" "$SCALE" "$RUNS"
        printf '%-20s %14s %16s %14s %14s\n' metric native restore_command walship "walship/native"
        for f in visible_lag_ms_p50 visible_lag_ms_p99 tps; do
            a=$(replay_median native "$f"); b=$(replay_median restore_command "$f"); c=$(replay_median walship "$f")
            ratio=$(ratio "$a" "$c")
            printf '%-20s %14s %16s %14s %14s\n' "$f" "$a" "$b" "$c" "$ratio"
        done
    } | tee "$WORK/replay-table.txt"
fi

# Medians per setup, then ratios walship / pg_receivewal.
median_of() { median "$RESULTS" "\"setup\":\"$1\"" "$2"; }  # setup field
FIELDS=(tps latency_ms flush_lag_ms_p50 flush_lag_ms_p99 flush_lag_bytes_p50 flush_lag_bytes_p99 wal_bytes raw_bytes wire_bytes receiver_cpu_s sender_cpu_s)
{
    printf '\nStreaming, pgbench -c 4 -T %s, scale %s, median of %s runs\n\n' "$SECONDS_PER_RUN" "$SCALE" "$RUNS"
    printf '%-22s %14s %14s %14s %12s\n' metric none pg_receivewal walship "walship/pgrw"
    for f in "${FIELDS[@]}"; do
        a=$(median_of none "$f"); b=$(median_of pg_receivewal "$f"); c=$(median_of walship "$f")
        ratio=$(ratio "$b" "$c")
        printf '%-22s %14s %14s %14s %12s\n' "$f" "$a" "$b" "$c" "$ratio"
    done
    raw=$(median_of walship raw_bytes); wire=$(median_of walship wire_bytes)
    awk -v r="$raw" -v w="$wire" 'BEGIN { if (r != "null" && r > 0) printf "\nwalship wire bytes / raw WAL bytes: %.1f%%\n", 100 * w / r }'
    if grep -qE '"setup":"(pg_receivewal|walship)_sync"' "$RESULTS"; then
        printf '\nSynchronous (synchronous_standby_names names the receiver), median of %s runs\n\n' "$RUNS"
        printf '%-22s %18s %14s %12s\n' metric pg_receivewal_sync walship_sync "walship/pgrw"
        for f in tps latency_ms; do
            b=$(median_of pg_receivewal_sync "$f"); c=$(median_of walship_sync "$f")
            ratio=$(ratio "$b" "$c")
            printf '%-22s %18s %14s %12s\n' "$f" "$b" "$c" "$ratio"
        done
    fi
    if grep -q '"setup":"pg_receivewal_relay' "$RESULTS"; then
        printf '\nRelay baseline: pg_receivewal through a byte relay (socat), median of %s runs.\n' "$RUNS"
        printf 'CPU per transaction (us) of the receiver and of the relay (for walship: wal-sender),\n'
        printf 'from the median CPU seconds and TPS; tps/pgrw against pg_receivewal connected directly.\n\n'
        printf '%-26s %10s %11s %11s %11s %9s\n' setup tps latency_ms recv_us/tx relay_us/tx tps/pgrw
        for s in pg_receivewal pg_receivewal_relay walship pg_receivewal_sync pg_receivewal_relay_sync walship_sync; do
            grep -q "\"setup\":\"$s\"" "$RESULTS" || continue
            base=pg_receivewal; [[ $s == *_sync ]] && base=pg_receivewal_sync
            t=$(median_of "$s" tps)
            per_tx() { awk -v c="$1" -v t="$t" -v n="$SECONDS_PER_RUN" 'BEGIN { if (c == "null" || t == "null" || t == 0) print "-"; else printf "%.0f", c * 1e6 / (t * n) }'; }
            printf '%-26s %10.1f %11s %11s %11s %9s\n' "$s" "$t" "$(median_of "$s" latency_ms)" \
                "$(per_tx "$(median_of "$s" receiver_cpu_s)")" "$(per_tx "$(median_of "$s" sender_cpu_s)")" \
                "$(ratio "$(median_of "$base" tps)" "$t")"
        done
    fi
} | tee "$WORK/table.txt"
{
    printf '{"scale":%s,"seconds":%s,"runs":%s,"bootstrap":[' "$SCALE" "$SECONDS_PER_RUN" "$RUNS"
    paste -sd, "$BOOT"
    printf '],"streaming":['
    paste -sd, "$RESULTS"
    printf '],"replay":['
    paste -sd, "$REPLAY"
    printf '],"catchup":['
    paste -sd, "$CATCHUP"
    printf '],"restore":['
    paste -sd, "$RESTORE"
    printf ']}\n'
} > "$(cd "$ROOT" && realpath -m "$OUT")"
say "raw numbers: $OUT"
