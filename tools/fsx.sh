#!/bin/bash
# Run fsx (xfstests' file system exerciser, ltp/fsx.c) against a fresh backupfs mount:
# random reads, writes, mapped reads and writes, truncates and reopens of one file, each
# checked against fsx's own copy of what the file must hold. Needs root and an xfstests
# checkout (git://git.kernel.org/pub/scm/fs/xfs/xfstests-dev.git, or its mirror
# github.com/kdave/xfstests); none of its code is part of this repository.
#
#   tools/fsx.sh XFSTESTS_CHECKOUT [OPS [SECONDS]]
#   MOUNT_ARGS=--writeback-cache tools/fsx.sh ...     (more `backupfs mount` arguments)
#
# OPS (default 20000) operations in each of six configurations, one after another; then
# SECONDS (default 300) of four fsx runs at once while, every second, a snapshot is taken
# and read back whole (a tar of it, hashed), every tenth the snapshots beyond the newest
# ten are pruned and every thirtieth the store is compacted. At the end every snapshot
# still there is read again and must hash as it did when taken: garbage collection and
# compaction under live writes must leave snapshots as they were. Then it unmounts and
# runs `backupfs fsck` and `backupfs verify` on the store. Fails if any fsx run,
# snapshot, read, prune, compaction or check fails, or the daemon logged an error or a
# traceback.
# Logs are kept in $WORK (default a new /tmp/backupfs-fsx.XXXXXX; KEEP=1 keeps the store).
set -euo pipefail

if [ $# -lt 1 ]; then
    echo "usage: $0 XFSTESTS_CHECKOUT [OPS [SECONDS]]" >&2
    exit 2
fi
XFS=$(cd "$1" && pwd)
OPS=${2:-20000}
SECONDS_STRESS=${3:-300}
# shellcheck source=tools/lib/fresh_mount.sh
. "$(dirname "$0")/lib/fresh_mount.sh"
require_root "it mounts"
if [ ! -f "$XFS/ltp/fsx.c" ]; then
    echo "$0: $XFS/ltp/fsx.c not found: is $XFS an xfstests checkout?" >&2
    exit 2
fi
command -v cc >/dev/null || { apt-get update -qq && apt-get install -y -qq gcc >/dev/null; }

WORK=${WORK:-$(mktemp -d /tmp/backupfs-fsx.XXXXXX)}
mkdir -p "$WORK/build" "$WORK/logs"

# fsx.c wants the config.h that xfstests' configure writes; these are what it needs from
# it on Linux with glibc (no libaio, no io_uring, no XFS headers).
cat > "$WORK/build/config.h" <<'EOF'
#define HAVE_SYS_TYPES_H 1
#define HAVE_SYS_STAT_H 1
#define HAVE_SYS_STATVFS_H 1
#define HAVE_SYS_TIME_H 1
#define HAVE_SYS_IOCTL_H 1
#define HAVE_SYS_WAIT_H 1
#define HAVE_MALLOC_H 1
#define HAVE_DIRENT_H 1
#define HAVE_STDLIB_H 1
#define HAVE_UNISTD_H 1
#define HAVE_FCNTL_H 1
#define HAVE_SYS_MMAN_H 1
#define HAVE_LINUX_FALLOC_H 1
#define HAVE_COPY_FILE_RANGE 1
#include <getopt.h>
#include <sys/param.h>
#include <assert.h>
EOF
FSX=$WORK/build/fsx
cc -O2 -D_GNU_SOURCE -D_FILE_OFFSET_BITS=64 -I"$WORK/build" -I"$XFS/include" -I"$XFS/src" \
    -o "$FSX" "$XFS/ltp/fsx.c" 2> "$WORK/build/cc.log" || {
    echo "$0: building fsx failed: see $WORK/build/cc.log" >&2
    exit 1
}

# shellcheck disable=SC2086  # MOUNT_ARGS are words
mount_fresh_store "$WORK" ${MOUNT_ARGS:-}

failed=0
run_fsx() {  # NAME SEED FSX-ARGS...: one fsx run on its own file; its log in logs/NAME
    local name=$1 seed=$2
    shift 2
    mkdir -p "$WORK/logs/$name" "$MNT/$name"
    "$FSX" -q -S "$seed" -P "$WORK/logs/$name" "$@" "$MNT/$name/file" \
        > "$WORK/logs/$name.out" 2>&1
}
report() {  # NAME STATUS
    if [ "$2" = 0 ] && grep -q 'completed A-OK' "$WORK/logs/$1.out"; then
        echo "  $1: $(grep -o 'All [0-9]* operations completed A-OK' "$WORK/logs/$1.out")"
    else
        echo "  $1: FAILED (exit $2): see $WORK/logs/$1.out and $WORK/logs/$1/"
        failed=1
    fi
}

# fsx's options for each configuration, by name, in the order they run alone; the four
# in `concurrent` also run at once, beside the snapshots.
declare -A config=(
    [default]=""
    [blocks-4M]="-l 4194304 -o 300000 -c 50"
    [invalidate]="-f -c 20 -l 1048576"
    [fsync]="-y -l 1048576"
    [direct]="-Z -R -W -r 4096 -w 4096 -t 4096 -l 2097152"
    [check-all]="-X -l 600000"
)
alone=(default blocks-4M invalidate fsync direct check-all)
concurrent=(blocks-4M invalidate fsync check-all)

echo "fsx, $OPS operations in each configuration:"
for name in "${alone[@]}"; do
    set +e
    # shellcheck disable=SC2086  # the options are words
    run_fsx "$name" 1 -N "$OPS" ${config[$name]}
    status=$?
    set -e
    report "$name" $status
done

echo "four fsx runs for ${SECONDS_STRESS}s; a snapshot every second, read back; prune and compact:"
pids=()
seed=100
for name in "${concurrent[@]}"; do
    seed=$((seed + 1))
    # shellcheck disable=SC2086
    run_fsx "stress-$name" $seed --duration="$SECONDS_STRESS" ${config[$name]} &
    pids+=($!)
done
snapshot_hash() {  # NAME: a hash of the snapshot's whole content, names and metadata
    tar -cf - --sort=name -C "$MNT/snapshots/$1" . 2>> "$WORK/logs/tar.err" | sha256sum | cut -c1-64
    [ "${PIPESTATUS[0]}" = 0 ]
}
declare -A taken_hash
snapshots=0
step() {  # WHAT COMMAND...: run a maintenance command, note a failure
    local what=$1
    shift
    if ! "$@" > "$WORK/logs/step.out" 2>&1; then
        echo "  $what failed: $(tail -n 3 "$WORK/logs/step.out")"
        failed=1
    fi
}
end=$((SECONDS + SECONDS_STRESS))
while [ $SECONDS -lt $end ]; do
    if ! name=$(bfs snapshot "$MNT" 2> "$WORK/logs/snapshot.err"); then
        echo "  snapshot failed: $(cat "$WORK/logs/snapshot.err")"
        failed=1
        break
    fi
    snapshots=$((snapshots + 1))
    if ! taken_hash[$name]=$(snapshot_hash "$name"); then
        echo "  reading snapshot $name failed: $(tail -n 3 "$WORK/logs/tar.err")"
        failed=1
    fi
    if [ $((snapshots % 10)) = 0 ]; then
        step prune bfs prune --keep-last 10 "$MNT"
    fi
    if [ $((snapshots % 30)) = 0 ]; then
        step compact bfs compact --threshold 0.2 "$MNT"
    fi
    sleep 1
done
for i in "${!pids[@]}"; do
    set +e
    wait "${pids[$i]}"
    status=$?
    set -e
    report "stress-${concurrent[$i]}" $status
done
kept=0
for name in "${!taken_hash[@]}"; do
    [ -d "$MNT/snapshots/$name" ] || continue  # pruned
    kept=$((kept + 1))
    if [ "$(snapshot_hash "$name")" != "${taken_hash[$name]}" ]; then
        echo "  snapshot $name reads differently now than when it was taken"
        failed=1
    fi
done
echo "  $snapshots snapshots taken and read back; the $kept kept read the same at the end"

bfs umount "$MNT" >/dev/null
echo "checks of the store:"
for check in fsck verify; do
    if bfs "$check" "$STORE" > "$WORK/logs/$check.out" 2>&1; then
        echo "  backupfs $check: $(tail -n 1 "$WORK/logs/$check.out")"
    else
        echo "  backupfs $check FAILED: see $WORK/logs/$check.out"
        failed=1
    fi
done
if grep -q -E ' (ERROR|CRITICAL) |Traceback' "$WORK/daemon.log"; then
    echo "the daemon logged an error: see $WORK/daemon.log"
    failed=1
fi
echo "logs: $WORK/logs, daemon log: $WORK/daemon.log"
exit $failed
