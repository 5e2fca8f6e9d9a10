"""The authenticator's caches (broker/tenants/auth.py): forgotten a fixed time after they
were stored, the oldest first when full."""

from __future__ import annotations

import time

import pytest

from broker.tenants.auth import Remembered


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(time, "monotonic", clock)
    return clock


def test_a_value_is_forgotten_when_its_time_is_up(clock: Clock) -> None:
    cache: Remembered[str, int] = Remembered(10, 60)
    cache["a"] = 1
    clock.now += 59.9
    assert cache.get("a") == 1  # a lookup does not extend it
    clock.now += 0.1
    assert cache.get("a") is None
    assert len(cache) == 0
    assert cache.get("never") is None


def test_storing_again_starts_its_time_again(clock: Clock) -> None:
    cache: Remembered[str, int] = Remembered(10, 60)
    cache["a"] = 1
    clock.now += 30
    cache["a"] = 2
    clock.now += 59
    assert cache.get("a") == 2


def test_when_full_the_expired_then_the_oldest_go_first(clock: Clock) -> None:
    cache: Remembered[str, int] = Remembered(3, 60)
    cache["a"] = 1
    clock.now += 10
    cache["b"] = 2
    cache["c"] = 3
    cache["a"] = 4  # stored again: now the newest
    cache["d"] = 5  # full: "b", the oldest stored, goes
    assert [cache.get(key) for key in "abcd"] == [4, None, 3, 5]
    clock.now += 55  # "c" (stored at +10) has 5 s left, "a" and "d" too
    cache["e"] = 6
    assert len(cache) == 3
    assert cache.get("c") is None  # the oldest again: nothing had expired yet
    clock.now += 10  # "a" and "d" expire; "e" has 50 s left
    cache["f"] = 7
    cache["g"] = 8
    assert [cache.get(key) for key in "adefg"] == [None, None, 6, 7, 8]


def test_clear_forgets_everything(clock: Clock) -> None:
    cache: Remembered[str, int] = Remembered(3, 60)
    cache["a"] = 1
    cache.clear()
    assert cache.get("a") is None
