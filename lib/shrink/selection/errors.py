"""Errors of the data-selection chapter (each message names the problem and the fix)."""

from __future__ import annotations

from ..errors import ShrinkError


class SelectionError(ShrinkError, ValueError):
    """Bad input to a selector, a pool or a metric (k larger than the pool, an empty target, ...)."""


class ShardError(ShrinkError):
    """A pool shard cannot be read (corrupt compression, a line that is not JSON, a missing field)."""
