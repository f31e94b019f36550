"""Errors that name the problem and the fix, and the one validation layer that raises them.

Every error raised for bad input derives from :class:`ShrinkError`, so a notebook or the CLI can catch
them and print the message as it is: the message already says what to change. The CLI prints
``{"error": <class name>, "message": ...}`` and exits with status 2 for a ``ShrinkError``; anything else is
a bug (``{"error": "internal", ...}``, status 1).

Error classes (each also subclasses the builtin a caller would naturally catch):

=====================  ==========================================================================
``BadInputError``      an argument or setting has an invalid value (``ValueError``)
``UnknownNameError``   a model, corpus, scale or experiment name that is not registered (``KeyError``)
``OfflineError``       something needs the network while Shrink is offline
``DataMissingError``   the offline data folder, or a file in it, is missing (``FileNotFoundError``)
``DataCorruptError``   a data file exists but is not what the manifest says (checksum, encoding, format)
``CacheCorruptError``  a cache entry (model copy, tensor cache, checkpoint) cannot be trusted
``EnvError``           an environment variable has a bad value (``SHRINK_THREADS=abc``)
``DeviceError``        a device that is not available here (``device="cuda"`` without CUDA)
``NotExecutedError``   a notebook output is not fully executed (half-run, failed or interrupted)
``NumericalError``     a computation produced NaN/inf where a number was promised
=====================  ==========================================================================

Validators (use them instead of ad-hoc checks, so every message has the same shape):
:func:`check_int` (positive / non-negative integers), :func:`check_fraction`, :func:`check_choice`,
:func:`check_finite_tensor`, :func:`env_int`.
"""

from __future__ import annotations

import math
import os


class ShrinkError(Exception):
    """Base class: bad input, with the fix in the message."""


class BadInputError(ShrinkError, ValueError):
    """An argument or setting has an invalid value."""


class UnknownNameError(ShrinkError, KeyError):
    """A model, corpus, scale or experiment name that is not registered."""

    def __str__(self):  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class OfflineError(ShrinkError):
    """Something needs the network (a Hub id, a dataset that is online only) while Shrink is offline."""


class DataMissingError(ShrinkError, FileNotFoundError):
    """The offline data folder, or a file in it, is missing."""


class DataCorruptError(ShrinkError, ValueError):
    """A data file exists but does not match the manifest (sha256), is not UTF-8, or does not parse."""


class CacheCorruptError(ShrinkError):
    """A cache entry cannot be read or trusted; the message names the file to delete."""


class RecordMissingError(ShrinkError):
    """``SHRINK_RESULTS_MODE=load`` and a result record (or tensor entry) is missing: nothing is computed."""


class RecordWriteError(ShrinkError):
    """A computed result could not be written. ``.result`` holds it and ``.fallback`` the file it was kept
    in (or None); the message names the folder, its free space and the setting to change."""

    result = None
    fallback = None


class UnstorableError(ShrinkError, TypeError):
    """A config or metric cannot be stored in a JSON record (the message names the entry and its type)."""

    result = None
    fallback = None


class UnsupportedModelError(ShrinkError):
    """The architecture has no adapter in :mod:`shrink.models`."""


class EnvError(ShrinkError, ValueError):
    """An environment variable (``SHRINK_*``) has a value Shrink cannot use."""


class DeviceError(ShrinkError, ValueError):
    """The requested device is not available on this machine."""


class NotExecutedError(ShrinkError):
    """An executed notebook is incomplete: a code cell did not run, raised, or the sanity checks did not run."""


class NumericalError(ShrinkError, ArithmeticError):
    """A result is NaN or infinite; the message names the likely cause."""


# --------------------------------------------------------------------------------------------------
# Validators
# --------------------------------------------------------------------------------------------------
def check_int(name: str, value, *, minimum: int = 1, allow_none: bool = False, fix: str = "") -> int | None:
    """``value`` as an ``int >= minimum`` (bools rejected); ``None`` passes when ``allow_none``.

    Raises :class:`BadInputError` naming ``name``, the value and the fix.
    """
    if value is None and allow_none:
        return None
    ok = isinstance(value, int) and not isinstance(value, bool)
    if not ok and hasattr(value, "__index__") and not isinstance(value, bool):
        try:
            value, ok = int(value.__index__()), True
        except TypeError:
            ok = False
    if not ok or value < minimum:
        want = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        none = " (or None for all)" if allow_none else ""
        raise BadInputError(f"{name} must be {want}{none}, got {value!r}. "
                            + (fix or f"Pass {name}={max(minimum, 1)} or larger."))
    return value


def check_fraction(name: str, value, *, lo: float = 0.0, hi: float = 1.0, hi_open: bool = True,
                   fix: str = "") -> float:
    """``value`` as a float in ``[lo, hi)`` (or ``[lo, hi]``); strings and NaN are rejected."""
    bracket = ")" if hi_open else "]"
    try:
        if isinstance(value, (str, bytes, bool)) or value is None:
            raise TypeError
        v = float(value)
    except (TypeError, ValueError):
        raise BadInputError(f"{name} must be a number in [{lo}, {hi}{bracket}, got {value!r}. "
                            + (fix or f"Pass a float such as {name}=0.5.")) from None
    if not (math.isfinite(v) and lo <= v and (v < hi if hi_open else v <= hi)):
        raise BadInputError(f"{name} must be in [{lo}, {hi}{bracket}, got {value!r}. "
                            + (fix or f"Pass a float such as {name}=0.5."))
    return v


def check_choice(name: str, value, choices, *, fix: str = ""):
    """``value`` if it is one of ``choices``; else :class:`BadInputError` listing them."""
    if value not in tuple(choices):
        raise BadInputError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}. "
                            + (fix or "Pick one of those."))
    return value


def check_finite_tensor(name: str, x, *, fix: str = "") -> None:
    """Raise :class:`BadInputError` if the tensor ``x`` holds NaN or inf (one cheap reduction)."""
    import torch

    if isinstance(x, torch.Tensor) and x.is_floating_point() and x.numel() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise BadInputError(f"{name} contains {bad} NaN/inf value(s) of {x.numel()}; "
                            + (fix or "find where they come from, or clean them with torch.nan_to_num first."))


def env_int(var: str, *, minimum: int = 1, default: int | None = None) -> int | None:
    """The integer value of environment variable ``var`` (``default`` if unset or empty).

    Raises :class:`EnvError` for anything that is not an integer ``>= minimum`` (``SHRINK_THREADS=abc``).
    """
    raw = os.environ.get(var, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise EnvError(f"{var}={raw!r} is not an integer >= {minimum}. Set it to e.g. `{var}=1` "
                       f"or unset it (`unset {var}`).")
    return value
