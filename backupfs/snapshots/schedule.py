"""The snapshot schedule from `config.toml`:

    [schedule]
    snapshot_every = "1h"      # seconds, or a number with s, m, h or d
    keep_last = 24
    keep_daily = 7
    keep_weekly = 4
    keep_monthly = 12
    label = "scheduled"        # optional

    compact_threshold = 0.5    # the default; false: never compact by itself

The daemon takes a snapshot every `snapshot_every` and then prunes by the keep rules
(held snapshots are always kept; no keep rule means nothing is pruned). Then it gives
dead space back to the disk: packs more than `compact_threshold` dead are rewritten, as
`backupfs compact --threshold` would, so what pruning and deleting free does not wait
for an admin to remember compaction.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import BackupfsError
from .retention import KeepPolicy

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
# As `backupfs compact`'s default: a pack is rewritten once half of it is dead, so the
# bytes moved never exceed the bytes given back.
DEFAULT_COMPACT_THRESHOLD = 0.5


def parse_duration(value) -> float:
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        m = _DURATION.match(str(value))
        if not m:
            raise BackupfsError(f"not a duration: {value!r} (use e.g. 30s, 15m, 1h, 1d)")
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if seconds <= 0:
        raise BackupfsError(f"duration must be positive, not {value!r}")
    return seconds


@dataclass(frozen=True)
class Schedule:
    every: float | None = None
    keep: KeepPolicy = field(default_factory=KeepPolicy)
    label: str = "scheduled"
    compact_threshold: float | None = DEFAULT_COMPACT_THRESHOLD   # None: never

    @property
    def enabled(self) -> bool:
        return self.every is not None

    @classmethod
    def from_config(cls, config: dict) -> "Schedule":
        table = dict(config.get("schedule", {}))
        every = table.pop("snapshot_every", None)
        label = table.pop("label", "scheduled")
        compact = parse_threshold(table.pop("compact_threshold", DEFAULT_COMPACT_THRESHOLD))
        try:
            keep = KeepPolicy.from_mapping(table)
        except ValueError as e:
            raise BackupfsError(f"config.toml [schedule]: {e}") from None
        return cls(parse_duration(every) if every is not None else None, keep, label,
                   compact)


def parse_threshold(value) -> float | None:
    """A pack's dead share above which it is rewritten: a number in [0, 1), or false."""
    if value is False:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise BackupfsError(f"config.toml [schedule]: compact_threshold must be a number "
                            f"from 0 to 1 (a share of dead bytes) or false, not {value!r}")
    return float(value)
