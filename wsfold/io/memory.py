"""Hand back to the OS the pages of a memory-mapped source weight that baking no longer needs, and ask for huge
pages for the large tensors baking writes.

A checkpoint loaded with mmap is a private file mapping: each weight's pages count in the resident set once read,
and stay there after the baked layer replaces the weight, for the mapping lives as long as any tensor of the
checkpoint does. Where every resident page of a range is still the file's own (nothing wrote a private copy,
as /proc/self/pagemap tells), MADV_DONTNEED unmaps them: the file stays in the page cache, and a page touched
again is simply mapped again. Otherwise MADV_PAGEOUT (Linux 5.4+) reclaims them with their content kept.
Anything else (anonymous memory, other systems, older kernels) is left alone.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import sys
from collections.abc import Iterator

import numpy as np
import torch

_MADV_DONTNEED = 4
_MADV_PAGEOUT = 21
_MADV_HUGEPAGE = 14
_PAGE = 4096
_HUGE = 2 << 20
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


def file_mappings() -> list[tuple[int, int]]:
    """The (start, end) of every mapping of a file that still exists, from /proc/self/maps, in address order.

    A list read before a model's tensors are baked serves the whole bake (reading it costs ~1 ms): those tensors
    were mapped before it was read. Should a listed range have been unmapped since and its addresses reused by
    anonymous memory, FilePages.release finds no file page there (pagemap) and keeps the content."""
    found = []
    try:
        with open("/proc/self/maps") as fh:
            for line in fh:
                fields = line.split(maxsplit=5)
                path = fields[5].strip() if len(fields) > 5 else ""
                if path.startswith("/") and not path.endswith("(deleted)"):
                    start, _, end = fields[0].partition("-")
                    found.append((int(start, 16), int(end, 16)))
    except OSError:
        return []
    return found


def _file_mapping_of(address: int, mappings: list[tuple[int, int]] | None = None) -> tuple[int, int] | None:
    """The (start, end) of the file-backed mapping holding ``address``."""
    mappings = file_mappings() if mappings is None else mappings
    i = bisect.bisect_right(mappings, (address, float("inf"))) - 1
    return mappings[i] if i >= 0 and mappings[i][0] <= address < mappings[i][1] else None


class FilePages:
    """The whole pages of ``tensor``'s bytes, when they lie in a file mapping, to reclaim in parts or at once."""

    def __init__(self, tensor: torch.Tensor, mappings: list[tuple[int, int]] | None = None) -> None:
        self.begin = self.end = 0
        self.row_bytes = 0
        ok = sys.platform.startswith("linux") and tensor.device.type == "cpu" and tensor.is_contiguous()
        if not ok or tensor.numel() == 0 or _madvise() is None:
            return
        begin = tensor.data_ptr()
        end = begin + tensor.numel() * tensor.element_size()
        mapping = _file_mapping_of(begin, mappings)
        if mapping is not None and mapping[0] <= begin and end <= mapping[1]:
            self.begin, self.end = begin, end
            self.row_bytes = (end - begin) // max(tensor.shape[0], 1) if tensor.ndim else end - begin

    def release(self, first_row: int = 0, last_row: int | None = None) -> bool:
        """Reclaim the whole pages inside rows [first_row, last_row) (dim 0); True if any were."""
        if self.end == 0:
            return False
        start = self.begin + first_row * self.row_bytes
        stop = self.end if last_row is None else min(self.end, self.begin + last_row * self.row_bytes)
        lo, hi = -(-start // _PAGE) * _PAGE, stop // _PAGE * _PAGE
        if hi - lo < 16 * _PAGE:
            return False
        advice = _MADV_DONTNEED if _only_file_pages(lo, hi) else _MADV_PAGEOUT
        return _madvise()(lo, hi - lo, advice) == 0


def _only_file_pages(lo: int, hi: int) -> bool:
    """Whether every resident page in [lo, hi) is a page of the mapped file rather than a private copy made when
    something wrote to it: pagemap's bit 63 (present) never without bit 61 (file page), and no page swapped out
    (bit 62). False when unknown."""
    try:
        with open("/proc/self/pagemap", "rb", buffering=0) as fh:
            fh.seek(lo // _PAGE * 8)
            data = fh.read((hi - lo) // _PAGE * 8)
    except OSError:
        return False
    if len(data) != (hi - lo) // _PAGE * 8:
        return False
    return _all_file_pages(np.frombuffer(data, dtype=np.uint64))


def _all_file_pages(entries: np.ndarray) -> bool:
    """Over pagemap entries: no page present without being the file's, none swapped out (a swapped-out page is a
    private copy too; not present, it would otherwise pass for one never touched)."""
    present, swapped, file_page = np.uint64(1 << 63), np.uint64(1 << 62), np.uint64(1 << 61)
    return not bool(np.any((entries & (present | file_page)) == present) or np.any(entries & swapped))


def release_file_pages(model: torch.nn.Module) -> None:
    """Hand back the resident pages of every tensor of ``model`` that lies in a file mapping (a checkpoint loaded
    with mmap): their content is kept, and they are mapped again from the file when next read. Until then the
    memory is free for other work (verify's onnxruntime session)."""
    for found in _model_file_pages(model):
        found.release()


def _model_file_pages(model: torch.nn.Module) -> list[FilePages]:
    """FilePages of every tensor of ``model`` (each once) that lies in a file mapping."""
    mappings = file_mappings() if sys.platform.startswith("linux") else []
    unique = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()] if t.device.type == "cpu"}
    return _file_pages(list(unique.values()), mappings)


def _file_pages(tensors: list[torch.Tensor | None], mappings: list[tuple[int, int]]) -> list[FilePages]:
    """FilePages of those CPU ``tensors`` that lie in one of the file ``mappings``."""
    if not mappings:
        return []
    found = [FilePages(t.detach(), mappings) for t in tensors if t is not None and t.device.type == "cpu"]
    return [f for f in found if f.end]


@contextlib.contextmanager
def released_after_call(*models: torch.nn.Module) -> Iterator[None]:
    """While the block lasts, the file-backed tensors a module of ``models`` owns (a checkpoint loaded with mmap)
    are handed back as soon as its forward ends: a model run whole then keeps resident the weights of the modules
    running (a layer and its parents), not all of them. Their pages are mapped again from the page cache when
    next read. One global module hook, not one per module: a module with hooks of its own runs another code path
    (nn.TransformerEncoderLayer's fast path is off)."""
    mappings = file_mappings() if sys.platform.startswith("linux") else []
    pages: dict[int, list[FilePages]] = {}
    for model in models:
        for module in model.modules():
            found = _file_pages([*module._parameters.values(), *module._buffers.values()], mappings)
            if found:
                pages[id(module)] = found

    def after(module: torch.nn.Module, args: object, output: object) -> None:
        for found in pages.get(id(module), ()):
            found.release()

    if not pages:
        yield
        return
    handle = torch.nn.modules.module.register_module_forward_hook(after, always_call=True)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def released_while_running(model: torch.nn.Module, interval: float = 0.2) -> Iterator[None]:
    """While the block lasts, the file-backed tensors of ``model`` are handed back every ``interval`` seconds, and
    once more at the end: for a library that reads every weight once (the dynamo exporter writing them out) and
    would otherwise leave the whole file resident. Only for a block that writes none of them: a page something
    wrote to is reclaimed with MADV_PAGEOUT, its content kept, but a write racing the check could be lost."""
    found = _model_file_pages(model)
    if not found:
        yield
        return
    import threading

    done = threading.Event()

    def loop() -> None:
        while not done.wait(interval):
            for pages in found:
                pages.release()

    worker = threading.Thread(target=loop, name="wsfold-release-pages", daemon=True)
    worker.start()
    try:
        yield
    finally:
        done.set()
        worker.join()
        for pages in found:
            pages.release()


def trim_heap() -> None:
    """Give the C heap's free memory back to the system (glibc's malloc_trim): what a library freed in many
    pieces, such as an onnxruntime session's buffers, otherwise stays resident for the rest of the process."""
    if not sys.platform.startswith("linux"):
        return
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return  # not glibc
    trim.argtypes = (ctypes.c_size_t,)
    trim(0)


def fresh_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """torch.empty, backed by transparent huge pages where the kernel offers them on request (Linux
    ``madvise`` mode): a fresh tensor of tens of MB is otherwise faulted in 4 KiB at a time when first written,
    which costs more than writing it (1.9 against 1.0 ns per float32 measured on the project's machine)."""
    out = torch.empty(shape, dtype=dtype)
    nbytes = out.numel() * out.element_size()
    madvise = _madvise() if sys.platform.startswith("linux") and nbytes >= 4 * _HUGE else None
    if madvise is not None:
        begin = out.data_ptr()
        lo, hi = -(-begin // _HUGE) * _HUGE, (begin + nbytes) // _HUGE * _HUGE
        if hi > lo:
            madvise(lo, hi - lo, _MADV_HUGEPAGE)  # advice only: refused or not, the tensor is the same
    return out
