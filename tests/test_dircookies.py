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
    assert cookies.names_held == 16
    cookies.table(3)                  # past the bound: the oldest table goes
    assert cookies.names_held == 8
    assert cookies.table(2) is other
    held.cookie_after(b"more")        # still growing in its open: no longer counted
    assert cookies.names_held == 8
    assert cookies.table(1) is not held and held.name_before(9) == b"more"


def test_a_walk_over_many_directories_keeps_a_bounded_number_of_tables():
    cookies = DirCookies(max_tables=3)
    tables = [cookies.table(ino) for ino in range(100)]
    assert cookies.table(99) is tables[99] and cookies.table(97) is tables[97]
    assert cookies.table(0) is not tables[0]
