"""Readdir cookies: the same in every open of a directory and after a restart, within a
memory bound."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backupfs.fs import dircookies
from backupfs.fs.dircookies import FIRST_COOKIE, DirCookies, name_cookie


def listing(names):
    """What Operations hands a table: the directory's names in order, counting calls."""
    calls = []

    def names_in_order():
        calls.append(1)
        return iter(sorted(names))
    return names_in_order, calls


def test_cookies_are_per_directory_and_shared_by_its_opens():
    cookies = DirCookies()
    a = cookies.table(10)
    x, y = a.cookie_after(b"x"), a.cookie_after(b"y")
    assert a.cookie_after(b"x") == x != y
    assert FIRST_COOKIE <= min(x, y) and max(x, y) < 1 << 62
    assert cookies.table(10) is a and cookies.table(11) is not a
    names, calls = listing([b"x", b"y"])
    assert a.name_before(0, names) is None and a.name_before(y, names) == b"y"
    assert calls == []  # known cookies cost no listing
    for unknown in (name_cookie(b"z"), 3, -1, 1 << 62):
        with pytest.raises(KeyError):
            a.name_before(unknown, names)


def test_a_cookie_survives_a_restart_by_listing_the_directory_once():
    names = [b"n%04d" % i for i in range(1000)]
    before = DirCookies().table(5)
    cookies = [before.cookie_after(n) for n in names]
    after = DirCookies().table(5)   # a new daemon: no table knows any cookie
    in_order, calls = listing(names)
    assert after.name_before(cookies[500], in_order) == names[500]
    assert len(calls) == 1 and len(after) == 501  # it stopped at the name
    assert after.name_before(cookies[200], in_order) == names[200]
    assert len(calls) == 1  # filled on the way
    assert after.name_before(cookies[999], in_order) == names[999]
    assert [after.cookie_after(n) for n in names] == cookies
    # The name is gone, and no table had it: refused, not guessed.
    gone, _ = listing(names[1:])
    with pytest.raises(KeyError):
        DirCookies().table(5).name_before(cookies[0], gone)


def test_names_with_one_hash_get_different_cookies_and_keep_them(monkeypatch):
    # Every name's first choice is the same cookie, and the second two apart.
    monkeypatch.setattr(dircookies, "name_cookie",
                        lambda name, seed=0: FIRST_COOKIE + seed * (2 + name[0] % 2))
    names = [b"a", b"b", b"c", b"d"]
    first = DirCookies().table(1)
    cookies = [first.cookie_after(n) for n in names]
    assert len(set(cookies)) == 4
    in_order, _ = listing(names)
    again = DirCookies().table(1)
    assert [again.name_before(c, in_order) for c in reversed(cookies)] == names[::-1]


@settings(max_examples=200, deadline=None)
@given(names=st.sets(st.binary(min_size=1, max_size=3), min_size=1, max_size=40),
       hash_space=st.integers(1, 8), data=st.data())
def test_any_cookie_given_means_its_name_in_a_new_table(names, hash_space, data):
    """With hashes forced into a tiny space (collisions everywhere), a listing's cookies
    are distinct and a new table, listing the same names, maps each back to its name."""
    def small_hash(name, seed=0):
        return FIRST_COOKIE + (sum(name) + seed * 7) % (hash_space + seed * 50)
    old = dircookies.name_cookie
    dircookies.name_cookie = small_hash
    try:
        ordered = sorted(names)
        given_out = DirCookies().table(1)
        cookies = [given_out.cookie_after(n) for n in ordered]
        assert len(set(cookies)) == len(cookies)
        fresh = DirCookies().table(1)
        in_order, _ = listing(ordered)
        for i in data.draw(st.permutations(range(len(ordered)))):
            assert fresh.name_before(cookies[i], in_order) == ordered[i]
    finally:
        dircookies.name_cookie = old


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
    more = held.cookie_after(b"more")  # still growing in its open: no longer counted
    assert cookies.names_held == 8
    nothing, calls = listing([])
    assert cookies.table(1) is not held and held.name_before(more, nothing) == b"more"
    assert calls == []


def test_a_walk_over_many_directories_keeps_a_bounded_number_of_tables():
    cookies = DirCookies(max_tables=3)
    tables = [cookies.table(ino) for ino in range(100)]
    assert cookies.table(99) is tables[99] and cookies.table(97) is tables[97]
    assert cookies.table(0) is not tables[0]
