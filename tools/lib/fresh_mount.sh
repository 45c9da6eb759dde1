# shellcheck shell=sh
# Sourced (POSIX sh) by the tools that run an outside test suite against a fresh backupfs
# mount: pjdfstest.sh and fsx.sh. Sets HERE (this checkout) and PY (its venv's python,
# else python3), and defines:
#   require_root WHY          exit 2 with a one-line message unless run as root
#   bfs ARGS...               this checkout's backupfs CLI
#   mount_fresh_store WORK [MOUNT ARGS...]
#                             a new store in WORK/store mounted at WORK/mnt (STORE and
#                             MNT), the daemon logging to WORK/daemon.log, and a trap that
#                             unmounts it at exit and removes it unless KEEP=1
HERE=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$HERE/.venv/bin/python}
[ -x "$PY" ] || PY=python3

require_root() {
    if [ "$(id -u)" != 0 ]; then
        echo "$0: run it as root ($1)" >&2
        exit 2
    fi
}

bfs() {
    (cd "$HERE" && "$PY" -m backupfs "$@")
}

_unmount_fresh_store() {
    cd /
    if mountpoint -q "$MNT"; then
        bfs umount "$MNT" >/dev/null 2>&1 || fusermount3 -u -z "$MNT" || true
    fi
    if [ "${KEEP:-0}" != 1 ]; then
        rm -rf "$STORE" "$MNT"
    fi
}

mount_fresh_store() {
    WORK=$1
    shift
    STORE=$WORK/store
    MNT=$WORK/mnt
    mkdir -p "$MNT"
    # A ^C, a kill, a hang-up or a reader that went away (`| head`) ends the script
    # through the EXIT trap, which unmounts: ^C and kill would otherwise only end the
    # command running, and the rest run against a store already unmounted; a hang-up
    # or a broken pipe would end the script with the store still mounted.
    trap _unmount_fresh_store EXIT
    trap 'exit 129' HUP
    trap 'exit 130' INT
    trap 'exit 141' PIPE
    trap 'exit 143' TERM
    bfs init "$STORE" >/dev/null
    bfs mount --log-file "$WORK/daemon.log" "$@" "$STORE" "$MNT" >/dev/null
}
