"""Administration over a store: fsck, verify, stats, diff, replication. Built on the
store and the namespace; used by the CLI, and by the daemon where a mounted store needs
it."""
