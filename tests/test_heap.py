"""The allocator tuning the daemon runs with: a READ's worth of buffers, allocated and
freed again and again, must not come back as fresh pages each time."""

from __future__ import annotations

import subprocess
import sys
import textwrap

CYCLES = textwrap.dedent("""
    import resource, sys
    if sys.argv[1] == "tuned":
        from backupfs.heap import keep_freed_memory
        assert keep_freed_memory()

    def read_reply():
        # What a 1 MiB READ allocates: eight decoded 128 KiB blocks, then their join.
        blocks = [bytes(128 * 1024) for _ in range(8)]
        return len(b"".join(blocks))

    read_reply()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(200):
        read_reply()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def page_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", CYCLES, mode], check=True,
                         capture_output=True, text=True).stdout
    return int(out)


def test_freed_read_buffers_are_reused_not_faulted_in_again():
    plain, tuned = page_faults("plain"), page_faults("tuned")
    # 200 replies of 2 MiB are 100,000 pages; glibc's defaults fault nearly all of them.
    assert tuned * 10 < plain, (plain, tuned)
    assert tuned < 200 * 512 // 10, tuned
