"""Write a whole pickled module as torch.save does (a zip archive of stored records that torch.load reads, mmap
included), with each record's CRC-32 computed on two threads while the file is written.

torch.save's writer computes every CRC and copies every byte on one thread: a 1.5 GB checkpoint took 1.2-1.5 s
to save on the project's machine, about 0.5 s of it the CRC. Here the records are what torch's own serializer
produces (``torch.serialization._save``, the function torch.save calls with its zip writer), so the pickle and
the storage keys are torch's; only the zip container is written by this module: each record stored (not
compressed) with its CRC-32 in its headers, its data aligned as ``.storage_alignment`` says, ZIP64 records where
sizes or offsets need them. Where torch's serializer does not have the signature this module knows, torch.save
writes the file instead.
"""

from __future__ import annotations

import inspect
import os
import pickle
import secrets
import struct
import threading
import zlib
from collections.abc import Callable
from pathlib import Path

import torch

from ..io.parallel import each_in_threads

_SAVE_PARAMS = ("obj", "zip_file", "pickle_module", "pickle_protocol", "_disable_byteorder_record")
_CHUNK = 1 << 20  # CRC'd, then written while still in the core's cache
_ZIP64_AT = 0xFFFFFFFF  # sizes and offsets from here on need ZIP64 fields (lower in tests)
_UTF8 = 0x800  # general purpose flag: the names are UTF-8
_DOS_DATE = 0x21  # 1980-01-01, the date torch's writer gives every record
_VERSION_RECORD = "3\n"  # what torch's writer adds as "version" (its minimum produced file format version)


def _torch_serializer() -> Callable | None:
    save = getattr(torch.serialization, "_save", None)
    try:
        params = tuple(inspect.signature(save).parameters) if save is not None else ()
    except (TypeError, ValueError):
        return None
    return save if params == _SAVE_PARAMS else None


class _Records:
    """Stands in for torch's zip writer: keeps each record torch's serializer hands it, in order."""

    def __init__(self) -> None:
        self.records: list[tuple[str, memoryview]] = []

    def write_record(self, name: str, data, size: int) -> None:
        self.records.append((name, _bytes_of(data, size)))


def _bytes_of(data, size: int) -> memoryview:
    if isinstance(data, str):
        data = data.encode()
    if isinstance(data, (bytes, bytearray)):
        return memoryview(data)[:size]
    # An UntypedStorage: its bytes, not a copy.
    view = torch.empty(0, dtype=torch.uint8).set_(data)
    return memoryview(view.numpy()).cast("B")[:size] if size else memoryview(b"")


def save_module(obj, path: str | Path) -> None:
    """torch.save(obj, path), with the CRCs on two threads (see the module's docstring)."""
    serializer = _torch_serializer()
    if serializer is None:
        torch.save(obj, path)
        return
    collected = _Records()
    serializer(obj, collected, pickle, 2, False)
    records = collected.records
    records.append(("version", memoryview(_VERSION_RECORD.encode())))
    records.append((".data/serialization_id", memoryview(f"{secrets.randbelow(10**40):040d}".encode())))
    alignment = next((int(bytes(b)) for n, b in records if n == ".storage_alignment"), 64)
    write_zip([(f"archive/{name}", data) for name, data in records], path, alignment)


class _Entry:
    def __init__(self, name: bytes, data: memoryview, header: int, start: int, pad: int) -> None:
        self.name, self.data, self.header, self.start, self.pad = name, data, header, start, pad
        self.crc = 0

    @property
    def zip64(self) -> bool:
        return len(self.data) >= _ZIP64_AT or self.header >= _ZIP64_AT

    def local_header(self) -> bytes:
        size = len(self.data)
        extra = struct.pack("<HHQQ", 1, 16, size, size) if self.zip64 else b""
        # The padding before the data, in an extra field of its own (id "FB", as torch's writer names it).
        extra += b"FB" + struct.pack("<H", self.pad) + b"Z" * self.pad
        small = 0xFFFFFFFF if self.zip64 else size
        version = 45 if self.zip64 else 20
        fields = (0x04034B50, version, _UTF8, 0, 0, _DOS_DATE, self.crc, small, small, len(self.name), len(extra))
        return struct.pack("<IHHHHHIIIHH", *fields) + self.name + extra

    def central_header(self) -> bytes:
        size = len(self.data)
        extra = struct.pack("<HHQQQ", 1, 24, size, size, self.header) if self.zip64 else b""
        small = 0xFFFFFFFF if self.zip64 else size
        version = 45 if self.zip64 else 20
        offset = 0xFFFFFFFF if self.zip64 else self.header
        fields = (0x02014B50, version, version, _UTF8, 0, 0, _DOS_DATE, self.crc, small, small, len(self.name))
        fields += (len(extra), 0, 0, 0, 0, offset)  # extra, comment, disk, internal and external attributes, offset
        return struct.pack("<IHHHHHHIIIHHHHHII", *fields) + self.name + extra


def _layout(records: list[tuple[str, memoryview]], alignment: int) -> tuple[list[_Entry], int]:
    entries, offset = [], 0
    for name, data in records:
        encoded = name.encode()
        zip64 = len(data) >= _ZIP64_AT or offset >= _ZIP64_AT
        before = offset + 30 + len(encoded) + (20 if zip64 else 0) + 4
        pad = -before % alignment
        entries.append(_Entry(encoded, data, offset, before + pad, pad))
        offset = before + pad + len(data)
    return entries, offset


def write_zip(records: list[tuple[str, memoryview]], path: str | Path, alignment: int = 64) -> None:
    """A zip archive of ``records`` (name, bytes), each stored, its data at a multiple of ``alignment``."""
    entries, end = _layout(records, alignment)
    stop = threading.Event()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:

        def write(entry: _Entry) -> None:
            crc = 0
            for lo in range(0, len(entry.data), _CHUNK):
                if stop.is_set():  # another thread failed, or the process is being stopped
                    return
                part = entry.data[lo : lo + _CHUNK]
                crc = zlib.crc32(part, crc)
                _pwrite_all(fd, part, entry.start + lo)
            entry.crc = crc
            _pwrite_all(fd, entry.local_header(), entry.header)

        # The largest records first, so that the two threads finish together.
        largest_first = sorted(entries, key=lambda e: -len(e.data))
        each_in_threads(write, largest_first, threads=2, stop=stop, name="wsfold-save")
        directory = b"".join(e.central_header() for e in entries)
        _pwrite_all(fd, directory + _end_records(len(entries), len(directory), end), end)
    finally:
        os.close(fd)  # every thread writing to it has ended (each_in_threads)


def _end_records(count: int, size: int, offset: int) -> bytes:
    """The end of central directory record, after the ZIP64 one and its locator where they are needed."""
    if count < 0xFFFF and size < _ZIP64_AT and offset < _ZIP64_AT:
        return struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count, count, size, offset, 0)
    zip64_end = struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, count, count, size, offset)
    locator = struct.pack("<IIQI", 0x07064B50, 0, offset + size, 1)
    return zip64_end + locator + struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done
