"""Retention: which snapshots a keep policy keeps, by restic's `forget` rules.

Snapshots are considered newest first. `last` keeps the N newest. Each calendar rule
(`hourly`, `daily`, `weekly` (ISO weeks), `monthly`, `yearly`) keeps the newest snapshot
of each of the N most recent periods that *have* a snapshot: empty periods do not count.
The rules are OR'ed: a snapshot is kept if any rule keeps it. Held snapshots are always
kept. A policy with no rule at all keeps everything (nothing is ever pruned by accident).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime, timezone, tzinfo
from typing import Iterable, Sequence


@dataclass(frozen=True)
class KeepPolicy:
    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0

    def is_empty(self) -> bool:
        return not any(getattr(self, f.name) for f in fields(self))

    @classmethod
    def from_mapping(cls, m: dict) -> "KeepPolicy":
        """From {'keep_daily': 7, ...} or {'daily': 7, ...}; unknown keys are an error."""
        values = {}
        names = {f.name for f in fields(cls)}
        for k, v in m.items():
            name = k.removeprefix("keep_").removeprefix("keep-")
            if name not in names:
                raise ValueError(f"unknown retention rule {k!r}")
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{k} must be a whole number >= 0")
            values[name] = v
        return cls(**values)


def _period(rule: str, t: datetime):
    if rule == "hourly":
        return (t.year, t.month, t.day, t.hour)
    if rule == "daily":
        return (t.year, t.month, t.day)
    if rule == "weekly":
        iso = t.isocalendar()
        return (iso.year, iso.week)
    if rule == "monthly":
        return (t.year, t.month)
    if rule == "yearly":
        return (t.year,)
    raise ValueError(rule)


CALENDAR_RULES = ("hourly", "daily", "weekly", "monthly", "yearly")


@dataclass(frozen=True)
class Decision:
    snapshot: object
    keep: bool
    reasons: tuple[str, ...]  # why it is kept ("last 3", "daily 2026-11-24", "held")


def decide(snapshots: Iterable, policy: KeepPolicy, tz: tzinfo | None = None) -> list[Decision]:
    """A decision for each snapshot (objects with `created_ns` and `hold`), newest first.

    Calendar periods are taken in `tz` (default: the machine's local time zone, as an
    admin reads "daily").
    """
    ordered = sorted(snapshots, key=lambda s: s.created_ns, reverse=True)
    reasons: dict[int, list[str]] = {id(s): [] for s in ordered}
    if policy.is_empty():
        for s in ordered:
            reasons[id(s)].append("no keep rule given")
    for i, s in enumerate(ordered[:policy.last]):
        reasons[id(s)].append(f"last {i + 1}")
    for rule in CALENDAR_RULES:
        budget = getattr(policy, rule)
        seen_period = None
        for s in ordered:
            if budget <= 0:
                break
            t = datetime.fromtimestamp(s.created_ns / 1e9, tz or timezone.utc).astimezone(tz)
            period = _period(rule, t)
            if period != seen_period:
                seen_period = period
                budget -= 1
                reasons[id(s)].append(f"{rule} {'-'.join(str(p) for p in period)}")
    for s in ordered:
        if getattr(s, "hold", False):
            reasons[id(s)].append("held")
    return [Decision(s, bool(reasons[id(s)]), tuple(reasons[id(s)])) for s in ordered]


def select_keep(snapshots: Sequence, policy: KeepPolicy, tz: tzinfo | None = None) -> list:
    """The snapshots the policy keeps, newest first."""
    return [d.snapshot for d in decide(snapshots, policy, tz) if d.keep]
