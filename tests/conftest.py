"""Fixtures shared by the tests: a mounted store (`mounted`) and the CLI runner."""

from __future__ import annotations

import pytest

from mounting import Detached, Mount


@pytest.fixture
def mount_factory(tmp_path):
    """Make mounts that are always unmounted at teardown: factory(name='m', *options)."""
    made: list[Mount] = []

    def make(name: str = "m", *options: str, **kw) -> Mount:
        m = Mount(tmp_path / f"{name}-store", tmp_path / f"{name}-mnt", *options, **kw)
        made.append(m)
        return m

    yield make
    for m in made:
        m.cleanup()


@pytest.fixture
def mounted(mount_factory):
    """A freshly initialised store, mounted; unmounted cleanly (and checked) at the end."""
    m = mount_factory().start()
    yield m
    if m.proc is not None:
        m.stop()


@pytest.fixture
def detached():
    """Stores mounted the way users mount them (`backupfs mount` detached, `mount -t`,
    fstab): detached.add(store, mountpoint) inits the store; everything is unmounted and
    every daemon gone at teardown."""
    d = Detached()
    yield d
    d.cleanup()
