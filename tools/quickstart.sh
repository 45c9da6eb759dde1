#!/usr/bin/env bash
# Set everything up, initialise a store and mount it: the README's first command.
#   STORE       where the store lives      (default /var/lib/backupfs/store)
#   MOUNTPOINT  where the filesystem shows (default /mnt/backupfs)
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
STORE=${STORE:-/var/lib/backupfs/store}
MOUNTPOINT=${MOUNTPOINT:-/mnt/backupfs}
BFS=.venv/bin/backupfs
if [ ! -f "$STORE/config.toml" ]; then
    $BFS init "$STORE"
fi
if mountpoint -q "$MOUNTPOINT" 2>/dev/null; then
    echo "backupfs: $MOUNTPOINT is already mounted"
else
    mkdir -p "$MOUNTPOINT"
    $BFS mount "$STORE" "$MOUNTPOINT"
fi
echo "backupfs: store $STORE is mounted at $MOUNTPOINT (snapshots under $MOUNTPOINT/snapshots)"
