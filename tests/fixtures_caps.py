"""Making a directory really unreadable for root: the tests run as root, whom file modes do not
stop (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH). An NFS export with root_squash or a FUSE mount
refuses root just the same; here the two capabilities are taken out of the *effective* set of
the calling thread for the duration (they stay permitted, so they come back afterwards). Threads
started meanwhile inherit the lowered set; worker processes of a forkserver started earlier do
not — so the trees used with this stay below the scanner's and the purge's process thresholds.
Outside a test: ``setpriv --bounding-set=-dac_override,-dac_read_search CMD``."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
from collections.abc import Iterator

_VERSION_3 = 0x20080522
_DAC_OVERRIDE = 1
_DAC_READ_SEARCH = 2

# setpriv in front of a command: the same, for a whole process and its children
NO_DAC = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _caps() -> tuple[_Header, ctypes.Array[_Data]]:
    hdr = _Header(_VERSION_3, 0)
    data = (_Data * 2)()
    if _libc.capget(ctypes.byref(hdr), data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    return hdr, data


def _set(hdr: _Header, data: ctypes.Array[_Data]) -> None:
    if _libc.capset(ctypes.byref(hdr), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


@contextlib.contextmanager
def no_dac_override() -> Iterator[None]:
    """File modes apply to this thread (root included) inside the block."""
    hdr, data = _caps()
    saved = data[0].effective
    data[0].effective &= ~((1 << _DAC_OVERRIDE) | (1 << _DAC_READ_SEARCH))
    _set(hdr, data)
    try:
        yield
    finally:
        hdr, data = _caps()
        data[0].effective = saved
        _set(hdr, data)
