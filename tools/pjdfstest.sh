#!/bin/sh
# Run pjdfstest (the POSIX conformance suite, github.com/pjd/pjdfstest) against a fresh
# backupfs mount. Needs root (pjdfstest switches uids) and a pjdfstest checkout; its
# code is never part of this repository.
#
#   tools/pjdfstest.sh /path/to/pjdfstest [prove args...]
#
# Builds pjdfstest in its checkout if needed, creates a store in a temporary directory,
# mounts it with -o allow_other, runs `prove -r` from inside the mount, unmounts and
# prints prove's summary. The full prove output is kept in $WORK/prove.log
# (WORK defaults to a new /tmp/backupfs-pjdfstest.XXXXXX; set KEEP=1 to keep it).
set -eu

if [ $# -lt 1 ]; then
    echo "usage: $0 PJDFSTEST_CHECKOUT [prove args...]" >&2
    exit 2
fi
PJD=$(cd "$1" && pwd)
shift
# shellcheck source=tools/lib/fresh_mount.sh
. "$(dirname "$0")/lib/fresh_mount.sh"
require_root "pjdfstest switches uids"

if [ ! -x "$PJD/pjdfstest" ]; then
    if ! command -v autoreconf >/dev/null || ! command -v make >/dev/null \
            || ! command -v cc >/dev/null || ! command -v prove >/dev/null; then
        echo "installing what building and running pjdfstest needs (autoconf, automake, gcc, make, perl)"
        apt-get update -qq
        apt-get install -y -qq autoconf automake gcc make perl >/dev/null
    fi
    echo "building pjdfstest in $PJD"
    (cd "$PJD" && autoreconf -ifs >/dev/null && ./configure >/dev/null && make pjdfstest >/dev/null)
fi

WORK=${WORK:-$(mktemp -d /tmp/backupfs-pjdfstest.XXXXXX)}
chmod 755 "$WORK"
mount_fresh_store "$WORK" -o allow_other

cd "$MNT"
set +e
prove -r "$@" "$PJD/tests" > "$WORK/prove.log" 2>&1
status=$?
set -e
cd /

# prove's summary: the failures table and the Result line.
sed -n '/^Test Summary Report/,$p' "$WORK/prove.log"
if ! grep -q '^Test Summary Report' "$WORK/prove.log"; then
    tail -n 3 "$WORK/prove.log"
fi
if grep -q Traceback "$WORK/daemon.log"; then
    echo "the daemon logged a traceback: see $WORK/daemon.log"
    status=1
fi
echo "full output: $WORK/prove.log, daemon log: $WORK/daemon.log"
exit $status
