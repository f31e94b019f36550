"""Errors that name the problem and the fix.

Every error raised for bad input derives from :class:`ShrinkError`, so a notebook or the CLI can catch
them and print the message as it is: the message already says what to change.
"""


class ShrinkError(Exception):
    """Base class: bad input, with the fix in the message."""


class UnknownNameError(ShrinkError, KeyError):
    """A model, corpus, scale or experiment name that is not registered."""

    def __str__(self):  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class OfflineError(ShrinkError):
    """Something needs the network (a Hub id, a dataset that is online only) while Shrink is offline."""


class DataMissingError(ShrinkError, FileNotFoundError):
    """The offline data folder, or a file in it, is missing."""


class CacheCorruptError(ShrinkError):
    """A cache entry cannot be read; the message names the file to delete."""


class UnsupportedModelError(ShrinkError):
    """The architecture has no adapter in :mod:`shrink.models`."""
