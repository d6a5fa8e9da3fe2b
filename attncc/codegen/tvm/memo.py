"""Memoization of per-call work keyed on IR values (regions, expressions).

Why a helper: node payloads are frozen values that hash structurally, so a region keys a cache;
a payload that does not hash (a user's unhashable constant) must still work, only uncached.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def by_value(maxsize: int) -> Callable[[F], F]:
    """``functools.lru_cache(maxsize)``, except that arguments that do not hash call ``fn`` directly."""

    def wrap(fn: F) -> F:
        cached = functools.lru_cache(maxsize=maxsize)(fn)

        @functools.wraps(fn)
        def call(*args: Any) -> Any:
            try:
                return cached(*args)
            except TypeError:  # a payload that does not hash
                return fn(*args)

        return call  # type: ignore[return-value]

    return wrap
