"""The daemon's schedule, without a mount: how a failed step is reported."""

from __future__ import annotations

import pytest

from backupfs.daemon.serve import Daemon
from backupfs.namespace import SnapshotHeld


@pytest.mark.parametrize("error, one_line", [
    (OSError(28, "No space left on device"), True),
    (SnapshotHeld("snapshot 2026-11-26T193619Z is held"), True),
    (KeyError("a bug"), False),
])
async def test_a_failed_scheduled_step_is_logged_and_the_schedule_goes_on(error, one_line,
                                                                          caplog):
    """An expected failure (a full disk during compaction, say) comes back at every
    interval: one warning line each time, not a traceback; a bug keeps its traceback."""
    async def step(*args, **kwargs):
        raise error

    assert await Daemon._scheduled("compaction", step, 0.5) is None
    [record] = [r for r in caplog.records if "scheduled compaction failed" in r.getMessage()]
    assert (record.exc_info is None) == one_line
    assert (record.levelname == "WARNING") == one_line

    async def works(threshold):
        return {"threshold": threshold}

    assert await Daemon._scheduled("compaction", works, 0.5) == {"threshold": 0.5}
