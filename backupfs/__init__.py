"""backupfs: a FUSE backup filesystem with copy-on-write, deduplicated, verified storage
and instant snapshots.

Layers, lowest first (imports point downward only):

    store      content-addressed block store: packs, codec, LMDB index
    namespace  epoch-versioned inodes, entries, block maps, xattrs; snapshot catalog and GC
    fs         pyfuse3 Operations, open handles, the virtual /snapshots tree
    daemon     mount lifecycle, transaction groups, control socket
    cli        the `backupfs` command
"""

__version__ = "0.1.0"
