"""The daemon: mounts a store with pyfuse3 under trio and keeps it consistent until
unmount (transaction-group timer, signals, clean shutdown)."""
