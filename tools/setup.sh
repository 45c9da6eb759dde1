#!/usr/bin/env bash
# Set up everything backupfs needs on a fresh Debian 12 machine (run as root).
# Idempotent: a second run only checks that everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
# strace: a test counts the xattr calls `ls -l` makes. shellcheck: a test lints the
# shell scripts (tests/test_shell_scripts.py).
for pkg in fuse3 libfuse3-dev pkg-config rsync attr strace shellcheck; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
# Samba, for the Previous Versions test (tests/test_samba.py): ~15 s, ~60 MB, without the
# recommended AD-DC packages. Installing it does not start a server here (no systemd).
# And NFS-Ganesha with libnfs's client, for the NFS test (tests/test_nas_ganesha.py; this
# kernel has neither the NFS server nor the client): ~15 s more. No server starts here.
need_smb=()
for pkg in samba samba-vfs-modules smbclient nfs-ganesha nfs-ganesha-vfs libnfs-utils rpcbind; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need_smb+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ] || [ ${#need_smb[@]} -gt 0 ]; then
    echo "setup: installing ${need_apt[*]} ${need_smb[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    [ ${#need_apt[@]} -eq 0 ] || apt-get install -y -qq "${need_apt[@]}" >/dev/null
    [ ${#need_smb[@]} -eq 0 ] || apt-get install -y -qq --no-install-recommends "${need_smb[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv" >&2
    "$PY" -m venv .venv
fi
# Checked from / and against this checkout: run here, `import backupfs` would find the
# package in the working directory even when the editable install points at a checkout
# that was moved or removed, and the commands at system paths below would then fail.
here=$(pwd -P)
if ! (cd / && "$here/.venv/bin/python" -c 'import sys, backupfs, pyfuse3, pytest_trio, hypothesis
sys.exit(backupfs.__path__[0] != sys.argv[1])' "$here/backupfs") >/dev/null 2>&1 \
   || [ pyproject.toml -nt .venv/.installed ]; then
    echo "setup: installing backupfs and its dependencies into .venv" >&2
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e '.[test]'
    touch .venv/.installed
fi

# Commands at system paths, for systemd units, fstab and mount(8) (which runs
# /sbin/mount.fuse.<type> with no PATH): symlinks into this checkout's .venv, made or
# re-pointed here, never over a file that is not a symlink.
link() {
    local target=$1 name=$2
    if [ -e "$name" ] && [ ! -L "$name" ]; then
        echo "setup: $name exists and is not a symlink: left alone" >&2
    elif [ "$(readlink "$name" 2>/dev/null)" != "$target" ]; then
        echo "setup: linking $name -> $target" >&2
        ln -sfn "$target" "$name"
    fi
}
link "$PWD/.venv/bin/backupfs" /usr/local/bin/backupfs
link "$PWD/.venv/bin/mount.fuse.backupfs" /sbin/mount.fuse.backupfs
