"""Retention rules against a brute-force reference, on random timestamps."""

from dataclasses import dataclass
from datetime import datetime, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backupfs.snapshots.retention import KeepPolicy, decide, select_keep
from backupfs.snapshots.schedule import Schedule, parse_duration
from backupfs.errors import BackupfsError


@dataclass(frozen=True)
class Snap:
    name: str
    created_ns: int
    hold: bool = False


PERIOD = {
    "hourly": lambda t: t.strftime("%Y-%m-%d %H"),
    "daily": lambda t: t.strftime("%Y-%m-%d"),
    "weekly": lambda t: "%d-W%02d" % t.isocalendar()[:2],
    "monthly": lambda t: t.strftime("%Y-%m"),
    "yearly": lambda t: t.strftime("%Y"),
}


def reference_keep(snaps, policy: KeepPolicy) -> set[str]:
    """Straight from the definition: the newest snapshot of each of the N most recent
    periods that have one, for every rule; the N newest; every held one."""
    if policy.is_empty():
        return {s.name for s in snaps}
    keep = set()
    newest_first = sorted(snaps, key=lambda s: s.created_ns, reverse=True)
    keep |= {s.name for s in newest_first[:policy.last]}
    for rule, period_of in PERIOD.items():
        n = getattr(policy, rule)
        periods: dict[str, Snap] = {}
        for s in snaps:
            p = period_of(datetime.fromtimestamp(s.created_ns / 1e9, timezone.utc))
            if p not in periods or s.created_ns > periods[p].created_ns:
                periods[p] = s
        recent = sorted(periods.values(), key=lambda s: s.created_ns, reverse=True)[:n]
        keep |= {s.name for s in recent}
    keep |= {s.name for s in snaps if s.hold}
    return keep


timestamps = st.lists(
    st.integers(min_value=1_500_000_000, max_value=1_900_000_000), min_size=0, max_size=60,
    unique=True)
policies = st.builds(KeepPolicy, *(st.integers(0, 6) for _ in range(6)))


@settings(max_examples=300, deadline=None)
@given(timestamps, policies, st.data())
def test_keep_rules_match_reference(ts, policy, data):
    holds = data.draw(st.lists(st.booleans(), min_size=len(ts), max_size=len(ts)))
    snaps = [Snap(f"s{i}", t * 10**9, hold=h) for i, (t, h) in enumerate(zip(ts, holds))]
    kept = {s.name for s in select_keep(snaps, policy, tz=timezone.utc)}
    assert kept == reference_keep(snaps, policy)


def test_reasons_say_why_each_is_kept():
    day = 86400 * 10**9
    base = 1_700_000_000 * 10**9
    snaps = [Snap(f"d{i}", base + i * day) for i in range(10)] + [Snap("held", base - day, hold=True)]
    decisions = {d.snapshot.name: d for d in decide(snaps, KeepPolicy(last=1, daily=3), tz=timezone.utc)}
    assert decisions["d9"].keep and "last 1" in decisions["d9"].reasons
    assert any(r.startswith("daily") for r in decisions["d8"].reasons)
    assert not decisions["d6"].keep and decisions["d6"].reasons == ()
    assert decisions["held"].keep and decisions["held"].reasons == ("held",)


def test_empty_periods_do_not_count():
    # Two snapshots a month apart: keep-daily 2 keeps both, though 30 days lie between.
    day = 86400 * 10**9
    snaps = [Snap("old", 1_700_000_000 * 10**9), Snap("new", 1_700_000_000 * 10**9 + 30 * day)]
    assert {s.name for s in select_keep(snaps, KeepPolicy(daily=2), tz=timezone.utc)} == {"old", "new"}


def test_policy_parsing():
    assert KeepPolicy.from_mapping({"keep_daily": 7, "last": 2}) == KeepPolicy(last=2, daily=7)
    with pytest.raises(ValueError):
        KeepPolicy.from_mapping({"keep_fortnightly": 1})
    with pytest.raises(ValueError):
        KeepPolicy.from_mapping({"keep_daily": -1})


def test_schedule_from_config():
    s = Schedule.from_config({"schedule": {"snapshot_every": "15m", "keep_last": 3}})
    assert s.enabled and s.every == 900 and s.keep == KeepPolicy(last=3)
    assert not Schedule.from_config({}).enabled
    assert parse_duration("1d") == 86400 and parse_duration(2) == 2
    with pytest.raises(BackupfsError):
        parse_duration("soon")
    with pytest.raises(BackupfsError):
        Schedule.from_config({"schedule": {"keep_often": 1}})


def test_schedule_compact_threshold():
    assert Schedule.from_config({"schedule": {"snapshot_every": "1h"}}).compact_threshold == 0.5
    assert Schedule.from_config({"schedule": {"compact_threshold": 0.2}}).compact_threshold == 0.2
    assert Schedule.from_config({"schedule": {"compact_threshold": 0}}).compact_threshold == 0
    assert Schedule.from_config({"schedule": {"compact_threshold": False}}).compact_threshold is None
    for bad in (1, 1.5, -0.1, "half", True):
        with pytest.raises(BackupfsError, match="compact_threshold"):
            Schedule.from_config({"schedule": {"compact_threshold": bad}})
