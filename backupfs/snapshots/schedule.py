"""The snapshot schedule from `config.toml`:

    [schedule]
    snapshot_every = "1h"      # seconds, or a number with s, m, h or d
    keep_last = 24
    keep_daily = 7
    keep_weekly = 4
    keep_monthly = 12
    label = "scheduled"        # optional

The daemon takes a snapshot every `snapshot_every` and then prunes by the keep rules
(held snapshots are always kept; no keep rule means nothing is pruned).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import BackupfsError
from .retention import KeepPolicy

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


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

    @property
    def enabled(self) -> bool:
        return self.every is not None

    @classmethod
    def from_config(cls, config: dict) -> "Schedule":
        table = dict(config.get("schedule", {}))
        every = table.pop("snapshot_every", None)
        label = table.pop("label", "scheduled")
        try:
            keep = KeepPolicy.from_mapping(table)
        except ValueError as e:
            raise BackupfsError(f"config.toml [schedule]: {e}") from None
        return cls(parse_duration(every) if every is not None else None, keep, label)
