"""What the run is doing now, for messages that say where it stopped (signals, failures).

    with phase("scoring the pruned model"):
        ...

One process-wide name: the CLI's signal handler runs outside any call stack that could carry it.
"""
from __future__ import annotations

from contextlib import contextmanager

_current = ["starting"]


@contextmanager
def phase(name: str):
    previous, _current[0] = _current[0], name
    yield  # on an exception the name stays: it says where the run stopped
    _current[0] = previous


def current() -> str:
    return _current[0]


def set_current(name: str) -> None:
    _current[0] = name
