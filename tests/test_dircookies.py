"""Readdir cookies shared by every open of a directory, within a memory bound."""

import pytest

from backupfs.fs.dircookies import DirCookies


def test_cookies_are_per_directory_and_shared_by_its_opens():
    cookies = DirCookies()
    a = cookies.table(10)
    assert [a.cookie_after(n) for n in (b"x", b"y", b"x")] == [1, 2, 1]
    assert cookies.table(10) is a and cookies.table(11) is not a
    assert a.name_before(0) is None and a.name_before(2) == b"y"
    for unknown in (3, -1):
        with pytest.raises(KeyError):
            a.name_before(unknown)


def test_the_oldest_tables_go_past_the_bound_but_an_open_keeps_its_own():
    cookies = DirCookies(max_names=10)
    held = cookies.table(1)           # what an open directory handle keeps
    for i in range(8):
        held.cookie_after(b"%d" % i)
    other = cookies.table(2)
    for i in range(8):
        other.cookie_after(b"%d" % i)
    cookies.table(3)                  # 16 names known: the oldest table goes
    assert cookies.table(2) is other
    assert cookies.table(1) is not held and held.name_before(8) == b"7"
