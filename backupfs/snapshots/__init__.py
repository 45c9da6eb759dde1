"""Snapshot policy: which snapshots to keep (retention) and when to take them (schedule).
Pure logic over snapshot records; the namespace does the taking and the freeing."""
