"""Typed exceptions raised by lowlat.

Bad arguments raise the built-in ``ValueError`` / ``TypeError`` (subclassed here so that callers can
catch lowlat's own), always naming the argument and the value.  Everything that goes wrong on the
device is reported through a status word that the kernels write and the host reads back; it surfaces
as one of the ``DeviceError`` subclasses below at the next check.
"""

from __future__ import annotations


class LowLatError(Exception):
    """Base class of every error lowlat raises on purpose."""


class ArgumentError(LowLatError, ValueError):
    """An argument has a bad value (shape, range, combination of options)."""


class ArgumentTypeError(LowLatError, TypeError):
    """An argument has the wrong type or dtype."""


class StaleHandleError(LowLatError, ValueError):
    """A dispatch handle was used after a later dispatch reused its static output slot (the native
    Buffer keeps two; build it with ``fresh_outputs=True`` to hold results longer)."""


class GraphCaptureError(LowLatError, RuntimeError):
    """Set-up work (compiling, allocating, rendezvous) was attempted while a CUDA graph is being
    captured.  Build the Buffer and call ``warmup()`` before capture."""


class CompileError(LowLatError, RuntimeError):
    """NVRTC rejected a kernel; the message carries the compiler log."""


class TransportError(LowLatError, RuntimeError):
    """A transport could not be set up (IPC handle exchange, peer access, group membership)."""


class UnavailableError(LowLatError, RuntimeError):
    """A feature needs something this machine does not have (a GPU, a library, a kind of link)."""


class DeviceError(LowLatError, RuntimeError):
    """A kernel reported a failure through the status word."""

    def __init__(self, message: str, *, code: int = 0, rank: int = -1, value: int = 0):
        super().__init__(message)
        self.code = code
        self.rank = rank
        self.value = value


class LowLatencyTimeoutError(DeviceError, TimeoutError):
    """A peer did not signal within the Buffer's timeout.  ``rank`` is the late peer; it has been
    masked on this rank, so later calls go on without it until the mask is cleared."""


class ProtocolError(DeviceError):
    """The call sequence broke the contract (a receive without a send, more than two calls in
    flight, a peer that ran two calls ahead)."""


class RoutingError(DeviceError, ValueError):
    """``topk_idx`` held an expert index outside ``[-1, num_experts)`` or ``num_tokens`` was out of
    range; detected on the device.  The offending entries were treated as ``-1``."""


class NormalTimeoutError(DeviceError, TimeoutError):
    """Normal mode: a peer did not signal within the NormalBuffer's timeout.  ``rank`` is the late
    peer; its data was left out of that call, and the ranks' call counters may now disagree
    (``NormalBuffer.reset()``, on every rank, is the way back)."""
