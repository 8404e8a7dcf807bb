#!/usr/bin/env bash
# Takes a base backup into a walship backup repository and applies retention. Safe to run
# from cron or a systemd timer: one run at a time per repository, one summary line on stdout,
# and an exit code for monitoring. Run it with --help for the flags.
#
# From cron (/etc/cron.d/walship-backup), every night at 01:30 as postgres:
#   30 1 * * *  postgres  /usr/share/walship/scripts/backup.sh --sender db1:7000 --name archive --repo /var/lib/walship/archive --keep 7
# From systemd, with the units of the Debian package (packaging/systemd): the same arguments
# as BACKUP_ARGS=... in /etc/walship/backup-archive.env, then
#   systemctl enable --now walship-backup@archive.timer
# runs walship-backup@archive.service nightly; 'systemctl list-timers' shows the next run,
# 'journalctl -u walship-backup@archive' the summary lines. Exit 75 (another run of this
# repository still going) counts as success there.
set -uo pipefail

SCRIPT_DIR=$(cd "$(dirname "$0")" && pwd)
REPO_ROOT=$(dirname "$SCRIPT_DIR")

usage() {
    cat <<EOF
Usage: $(basename "$0") --sender HOST:PORT --name NAME --repo DIR [--keep N] [options] [-- ARGS]

Runs 'wal-receiver backup' into the repository DIR, then keeps the newest N backups (and
the WAL they need). Its full log is appended to DIR/backup.log. It prints one line:

  walship-backup OK repo=DIR id=ID start=LSN stop=LSN bytes=N stored=N seconds=S backups=K
  walship-backup FAILED repo=DIR exit=CODE seconds=S error="..."
  walship-backup SKIPPED repo=DIR another backup of this repository is running

Nightly from cron:
  30 1 * * *  postgres  $SCRIPT_DIR/$(basename "$0") --sender HOST:PORT --name NAME --repo DIR --keep 7
or from systemd: BACKUP_ARGS=... in /etc/walship/backup-NAME.env, then
  systemctl enable --now walship-backup@NAME.timer

Keep the archive continuous between backups with
  wal-receiver follow --sender HOST:PORT --name NAME --wal-dir DIR/wal
(same --name): a backup then waits for that follower instead of fetching WAL itself.

  --sender HOST:PORT    a wal-sender (repeatable: the primary among them is used)
  --name NAME           the repository's receiver name (slot walship_NAME)
  --repo DIR            the backup repository (created if missing)
  --keep N              keep the newest N backups (default: keep all)
  --bin DIR             where wal-receiver lives (default: \$WALSHIP_BIN_DIR, else the
                        directory of 'command -v wal-receiver', else
                        $REPO_ROOT/target/release)
  -- ARGS               further arguments for 'wal-receiver backup' (e.g. --tls-ca FILE)
  -h, --help            show this help

Exit status: 0 the backup is complete (and retention applied); 75 another backup of this
repository is running; otherwise the exit code of wal-receiver (see its README: 2 bad
usage, 3 WAL gone, 4 wrong cluster, 7 disk, 9 TLS, ...).
EOF
}

SENDERS=() NAME="" REPO="" KEEP="" BIN="${WALSHIP_BIN_DIR:-}" EXTRA=()
need_value() {
    if [ $# -lt 2 ] || [ -z "$2" ]; then
        echo "walship-backup FAILED exit=2 error=\"$1 needs a value\""; exit 2
    fi
}
while [ $# -gt 0 ]; do
    case $1 in
        --sender) need_value "$@"; SENDERS+=(--sender "$2"); shift 2 ;;
        --name) need_value "$@"; NAME=$2; shift 2 ;;
        --repo) need_value "$@"; REPO=$2; shift 2 ;;
        --keep) need_value "$@"; KEEP=$2; shift 2 ;;
        --bin) need_value "$@"; BIN=$2; shift 2 ;;
        --) shift; EXTRA=("$@"); break ;;
        -h|--help) usage; exit 0 ;;
        *) echo "walship-backup FAILED exit=2 error=\"unknown argument $1 (see --help)\""; exit 2 ;;
    esac
done
if [ ${#SENDERS[@]} -eq 0 ] || [ -z "$NAME" ] || [ -z "$REPO" ]; then
    echo "walship-backup FAILED exit=2 error=\"--sender, --name and --repo are required (see --help)\""
    exit 2
fi
if [ -z "$BIN" ]; then
    if command -v wal-receiver >/dev/null; then BIN=$(dirname "$(command -v wal-receiver)")
    else BIN=$REPO_ROOT/target/release; fi
fi
# The repository, its log and lock are private to their owner, as wal-receiver makes what it
# creates; readable by the owner's group as well with --allow-group-access.
umask 077
for a in "${EXTRA[@]+"${EXTRA[@]}"}"; do [ "$a" != --allow-group-access ] || umask 027; done
RECEIVER=$BIN/wal-receiver
if [ ! -x "$RECEIVER" ]; then
    echo "walship-backup FAILED repo=$REPO exit=2 error=\"$RECEIVER is missing (give --bin)\""
    exit 2
fi
mkdir -p "$REPO" || { echo "walship-backup FAILED repo=$REPO exit=1 error=\"cannot create the repository\""; exit 1; }
LOG=$REPO/backup.log

# One run at a time per repository: a cron run that finds the previous one still going
# says so and leaves.
exec 9>>"$REPO/backup.lock"
if ! flock -n 9; then
    echo "walship-backup SKIPPED repo=$REPO another backup of this repository is running"
    exit 75
fi

started=$(date +%s)
args=(backup "${SENDERS[@]}" --name "$NAME" --repo "$REPO")
[ -z "$KEEP" ] || args+=(--keep "$KEEP")
{ echo "=== $(date -u +%Y-%m-%dT%H:%M:%SZ) wal-receiver ${args[*]} ${EXTRA[*]}"; } >>"$LOG"
log_start=$(stat -c %s "$LOG")
out=$("$RECEIVER" "${args[@]}" "${EXTRA[@]}" 2>>"$LOG")
code=$?
echo "$out" >>"$LOG"
seconds=$(( $(date +%s) - started ))
if [ "$code" -ne 0 ]; then
    # This run's error only: what it appended to the log.
    err=$(tail -c +"$((log_start + 1))" "$LOG" | grep -a 'wal-receiver:' | tail -1 \
        | sed 's/^wal-receiver: //; s/"/'\''/g' | cut -c1-300)
    echo "walship-backup FAILED repo=$REPO exit=$code seconds=$seconds error=\"${err:-see $LOG}\""
    exit "$code"
fi
# "backup ID complete: START to STOP, BYTES bytes stored as STORED"
read -r id start stop bytes stored < <(sed -n \
    's/^backup \([^ ]*\) complete: \([^ ]*\) to \([^,]*\), \([0-9]*\) bytes stored as \([0-9]*\)$/\1 \2 \3 \4 \5/p' <<<"$out")
count=$("$RECEIVER" backups --repo "$REPO" --json 2>>"$LOG" | grep -o '"id":' | wc -l)
echo "walship-backup OK repo=$REPO id=$id start=$start stop=$stop bytes=$bytes stored=$stored seconds=$seconds backups=$count"
