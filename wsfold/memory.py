"""Hand back to the OS the pages of a memory-mapped source weight that baking no longer needs.

A checkpoint loaded with mmap is a private file mapping: each weight's pages count in the resident set once read,
and stay there after the baked layer replaces the weight, for the mapping lives as long as any tensor of the
checkpoint does. MADV_PAGEOUT (Linux 5.4+) reclaims such pages now; their content is kept (a clean file page
is simply read again if touched). Anything else (anonymous memory, other systems, older kernels) is left alone.
"""

from __future__ import annotations

import ctypes
import sys

import torch

_MADV_PAGEOUT = 21
_PAGE = 4096
_libc = None


def _madvise():
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        except (OSError, AttributeError):
            _libc = False
    return _libc.madvise if _libc else None


def _file_mapping_of(address: int) -> tuple[int, int] | None:
    """The (start, end) of the file-backed mapping holding ``address``, from /proc/self/maps."""
    try:
        with open("/proc/self/maps") as fh:
            for line in fh:
                fields = line.split(maxsplit=5)
                start, _, end = fields[0].partition("-")
                lo, hi = int(start, 16), int(end, 16)
                if lo <= address < hi:
                    path = fields[5].strip() if len(fields) > 5 else ""
                    return (lo, hi) if path.startswith("/") and not path.endswith("(deleted)") else None
    except OSError:
        return None
    return None


def release_pages(tensor: torch.Tensor) -> bool:
    """Reclaim the whole pages inside ``tensor``'s bytes when they belong to a file mapping; True if done."""
    if not sys.platform.startswith("linux") or tensor.device.type != "cpu" or not tensor.is_contiguous():
        return False
    madvise = _madvise()
    if madvise is None:
        return False
    begin = tensor.data_ptr()
    end = begin + tensor.numel() * tensor.element_size()
    lo, hi = -(-begin // _PAGE) * _PAGE, end // _PAGE * _PAGE
    if hi - lo < 16 * _PAGE:
        return False
    mapping = _file_mapping_of(begin)
    if mapping is None or not (mapping[0] <= lo and hi <= mapping[1]):
        return False
    return madvise(lo, hi - lo, _MADV_PAGEOUT) == 0
