"""Raw CUDA events for the host path of ``async_finish`` calls.

A ``torch.cuda.Event`` plus ``Stream.wait_stream`` cost tens of microseconds of host time per call;
these go straight to the driver (a microsecond or two each).  A Buffer keeps a small ring of events
made at construction; an event is recorded again after ``EVENT_RING`` further async calls, which can
only make an old holder wait longer, never shorter.
"""

from __future__ import annotations

import torch

from .errors import DeviceError
from .jit.launch import current_stream_handle, ensure_context

EVENT_RING = 64


class RawEvent:
    """A CUDA event without timing, with the methods of ``torch.cuda.Event`` that lowlat's callers use."""

    __slots__ = ("handle", "device_index", "_driver")

    def __init__(self, device_index: int):
        from cuda.bindings import driver

        ensure_context(device_index)
        err, self.handle = driver.cuEventCreate(driver.CUevent_flags.CU_EVENT_DISABLE_TIMING)
        if err:
            raise DeviceError(f"cuEventCreate failed ({err!r})")
        self.device_index, self._driver = device_index, driver

    def record(self, stream: int) -> None:
        """Record on the raw stream handle ``stream``."""
        (err,) = self._driver.cuEventRecord(self.handle, stream)
        if err:
            raise DeviceError(f"cuEventRecord failed ({err!r})")

    def wait(self, stream=None) -> None:
        """Make ``stream`` (a raw handle, a torch stream, or None: the current stream) wait for the event."""
        if stream is None:
            stream = current_stream_handle(self.device_index)
        elif stream.__class__ is not int and isinstance(stream, torch.cuda.Stream):  # a raw handle is the hot path
            stream = stream.cuda_stream
        (err,) = self._driver.cuStreamWaitEvent(stream, self.handle, 0)
        if err:
            raise DeviceError(f"cuStreamWaitEvent failed ({err!r})")

    def query(self) -> bool:
        (err,) = self._driver.cuEventQuery(self.handle)
        if err == self._driver.CUresult.CUDA_ERROR_NOT_READY:
            return False
        if err:
            raise DeviceError(f"cuEventQuery failed ({err!r})")
        return True

    def synchronize(self) -> None:
        (err,) = self._driver.cuEventSynchronize(self.handle)
        if err:
            raise DeviceError(f"cuEventSynchronize failed ({err!r})")

    def __del__(self):
        try:
            self._driver.cuEventDestroy(self.handle)
        except Exception:  # interpreter shutdown
            pass


class EventRing:
    """``EVENT_RING`` events handed out in turn."""

    def __init__(self, device_index: int, size: int = EVENT_RING):
        self._events = [RawEvent(device_index) for _ in range(size)]
        self._next = 0

    def next(self) -> RawEvent:
        event = self._events[self._next]
        self._next = (self._next + 1) % len(self._events)
        return event
