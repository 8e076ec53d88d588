"""Write an ONNX graph whose weights live in external data files without holding the weights in memory.

While wsfold rewrites and checks a graph, its proto holds only references into the exporter's data file. The
written graph is then assembled from that proto and the data file one tensor at a time: either with its own
data file (``write_external``) or as one self-contained file (``write_single``). A self-contained file is the
protobuf encoding of the whole model; protobuf lets a message's fields arrive in any order, so the graph is
written as the small proto without its initializers followed by each initializer's bytes, streamed from disk.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import external_data_helper, numpy_helper

# Protobuf field numbers (onnx.proto): ModelProto.graph, GraphProto.initializer, TensorProto.raw_data.
_MODEL_GRAPH, _GRAPH_INITIALIZER, _TENSOR_RAW_DATA = 7, 5, 9
_TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 13, 14
_LENGTH_DELIMITED = 2
_CHUNK = 16 << 20


def is_external(tensor: onnx.TensorProto) -> bool:
    return external_data_helper.uses_external_data(tensor)


def _location(tensor: onnx.TensorProto, base_dir: Path) -> tuple[Path, int, int]:
    """(file, offset, length) of an external tensor's bytes; the length from its shape when not recorded."""
    info = external_data_helper.ExternalDataInfo(tensor)
    name = Path(info.location)
    if name.is_absolute() or ".." in name.parts:
        raise ValueError(f"tensor {tensor.name!r} points outside its folder: {info.location!r}")
    return base_dir / name, info.offset or 0, info.length or _byte_size(tensor)


def _byte_size(tensor: onnx.TensorProto) -> int:
    count = int(np.prod(tensor.dims, dtype=np.int64)) if len(tensor.dims) else 1
    return count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def external_length(tensor: onnx.TensorProto, base_dir: Path) -> int:
    return _location(tensor, base_dir)[2]


def read_bytes(tensor: onnx.TensorProto, base_dir: Path) -> bytes:
    """The raw bytes of a tensor, from its external data file when it has one."""
    if not is_external(tensor):
        return tensor.raw_data if tensor.HasField("raw_data") else numpy_helper.to_array(tensor).tobytes()
    path, offset, length = _location(tensor, base_dir)
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def _chunks(tensor: onnx.TensorProto, base_dir: Path) -> Iterator[bytes]:
    path, offset, left = _location(tensor, base_dir)
    with open(path, "rb") as f:
        f.seek(offset)
        while left:
            chunk = f.read(min(left, _CHUNK))
            if not chunk:
                raise ValueError(f"external data of tensor {tensor.name!r} ends early in {path.name}")
            left -= len(chunk)
            yield chunk


def to_array(tensor: onnx.TensorProto, base_dir: Path | None) -> np.ndarray:
    """A tensor's value (its proto is not changed). External data is read as onnxruntime reads it: a data file
    that is a link is followed (onnx's own reader refuses links)."""
    if is_external(tensor):
        plain = _plain(tensor)
        plain.raw_data = read_bytes(tensor, base_dir)
        return numpy_helper.to_array(plain)
    return numpy_helper.to_array(tensor)


def _plain(tensor: onnx.TensorProto) -> onnx.TensorProto:
    """The tensor's description without its data or any external data entry."""
    copy = onnx.TensorProto()
    copy.CopyFrom(tensor)
    copy.ClearField("raw_data")
    copy.ClearField("data_location")
    del copy.external_data[:]
    return copy


def write_external(
    model: onnx.ModelProto, base_dir: Path, data_path: Path, *, location: str, threshold: int = 1024
) -> None:
    """Write every initializer of ``threshold`` bytes or more into ``data_path`` (one after the other, 64-byte
    aligned), copied from wherever it is now, and point ``model`` at it by ``location``."""
    with open(data_path, "wb") as out:
        for tensor in model.graph.initializer:
            external = is_external(tensor)
            size = external_length(tensor, base_dir) if external else len(read_bytes(tensor, base_dir))
            if size < threshold:
                if external:
                    raw = read_bytes(tensor, base_dir)
                    tensor.CopyFrom(_plain(tensor))
                    tensor.raw_data = raw
                continue
            offset = out.seek(0, io.SEEK_END)
            if offset % 64:
                out.write(b"\0" * (64 - offset % 64))
                offset = out.tell()
            if external:
                for chunk in _chunks(tensor, base_dir):
                    out.write(chunk)
            else:
                out.write(read_bytes(tensor, base_dir))
            tensor.CopyFrom(_plain(tensor))
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(size))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(field: int) -> bytes:
    return _varint(field << 3 | _LENGTH_DELIMITED)


def _field_header(field: int, length: int) -> bytes:
    return _key(field) + _varint(length)


# protobuf refuses to parse a message of 2 GiB or more.
MAX_SINGLE_FILE = (2 << 30) - 1


def write_single(model: onnx.ModelProto, base_dir: Path, path: Path) -> None:
    """Write ``model`` as one self-contained file, streaming external initializers from ``base_dir``."""
    # Each initializer as (its description without data, the length of its data, whether the data is external).
    parts = []
    for tensor in model.graph.initializer:
        if is_external(tensor):
            head = _plain(tensor).SerializeToString()
            parts.append((tensor, head, external_length(tensor, base_dir)))
        else:
            parts.append((tensor, tensor.SerializeToString(), None))
    tensor_sizes = [len(h) + (len(_field_header(_TENSOR_RAW_DATA, n)) + n if n is not None else 0) for _, h, n in parts]
    graph = onnx.GraphProto()
    graph.CopyFrom(model.graph)
    del graph.initializer[:]
    graph_head = graph.SerializeToString()
    del graph
    graph_size = len(graph_head) + sum(len(_field_header(_GRAPH_INITIALIZER, s)) + s for s in tensor_sizes)
    shell = onnx.ModelProto()
    shell.CopyFrom(model)  # cheap: the large initializers are references
    shell.ClearField("graph")
    shell_bytes = shell.SerializeToString()
    total = len(shell_bytes) + len(_field_header(_MODEL_GRAPH, graph_size)) + graph_size
    if total > MAX_SINGLE_FILE:
        raise OverflowError(f"the graph would be {total} bytes, more than one protobuf file can hold (2 GiB)")
    with open(path, "wb") as out:
        out.write(shell_bytes)
        out.write(_field_header(_MODEL_GRAPH, graph_size))
        out.write(graph_head)
        for (tensor, head, length), size in zip(parts, tensor_sizes):
            out.write(_field_header(_GRAPH_INITIALIZER, size))
            out.write(head)
            if length is not None:
                out.write(_field_header(_TENSOR_RAW_DATA, length))
                for chunk in _chunks(tensor, base_dir):
                    out.write(chunk)
        written = out.tell()
    if written != total:
        raise AssertionError(f"wrote {written} bytes of a {total}-byte graph")


def load_without_weights(path: Path) -> onnx.ModelProto:
    """The model at ``path`` with every initializer's data left on disk: an external one as it is, an embedded
    one (raw_data of 1 KiB or more) turned into an external reference to its own bytes in ``path``. Only the
    graph's structure is read (onnx.load reads the file whole and holds the weights twice while parsing them)."""
    with open(path, "rb") as f:
        size = f.seek(0, io.SEEK_END)
        f.seek(0)
        model = _message(f, size, {_MODEL_GRAPH: lambda stop: _message(f, stop, _graph_handlers(f, path.name))})
    return onnx.ModelProto.FromString(model)


def _graph_handlers(f, location: str) -> dict:
    return {_GRAPH_INITIALIZER: lambda stop: _tensor(f, stop, location)}


def _tensor(f, end: int, location: str) -> bytes:
    """A TensorProto; when it embeds 1 KiB or more of raw_data, that field gives way to external data entries
    pointing at those bytes in the file itself, and any data_location or external_data it had is dropped (the
    last value of a field wins in protobuf, wherever it stands)."""
    start = f.tell()
    raw = _field_span(f, end, _TENSOR_RAW_DATA)
    f.seek(start)
    if raw is None or raw[1] < 1024:
        return _message(f, end, {})
    offset, length = raw
    entries = b""
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        # Lengths in bytes: a non-ASCII file name is longer in UTF-8 than in characters.
        key_bytes, value_bytes = key.encode(), value.encode()
        entry = _key(1) + _varint(len(key_bytes)) + key_bytes + _key(2) + _varint(len(value_bytes)) + value_bytes
        entries += _key(_TENSOR_EXTERNAL_DATA) + _varint(len(entry)) + entry
    dropped = {_TENSOR_RAW_DATA: None, _TENSOR_EXTERNAL_DATA: None, _TENSOR_DATA_LOCATION: None}
    kept = _message(f, end, dropped)
    return kept + entries + _varint(_TENSOR_DATA_LOCATION << 3) + _varint(onnx.TensorProto.EXTERNAL)


def _field_span(f, end: int, wanted: int) -> tuple[int, int] | None:
    """(offset, length) of the last length-delimited field ``wanted`` of the message from here to ``end``."""
    found = None
    for field, wire, value_start, stop in _fields(f, end):
        if field == wanted and wire == _LENGTH_DELIMITED:
            found = (value_start, stop - value_start)
    return found


def _fields(f, end: int):
    """(field, wire type, where its value starts, where it stops) for each field of the message from here to
    ``end``; the file is left at the field's end after each."""
    while f.tell() < end:
        key = _read_varint(f)
        field, wire = key >> 3, key & 7
        if wire == _LENGTH_DELIMITED:
            length = _read_varint(f)
            value_start = f.tell()
            stop = value_start + length
        else:
            value_start = f.tell()
            if wire == 0:
                _read_varint(f)
            elif wire in (1, 5):
                f.seek(8 if wire == 1 else 4, io.SEEK_CUR)
            else:
                raise ValueError(f"unsupported protobuf wire type {wire}")
            stop = f.tell()
        if stop > end:
            raise ValueError("a field runs past the end of its message")
        yield field, wire, value_start, stop
        f.seek(stop)


def _message(f, end: int, handlers: dict) -> bytes:
    """The fields of the message from here to ``end`` as they are, except a length-delimited field with a
    handler: None drops it, else the handler (given the field's end, the file at its value) returns the bytes
    of the message that replaces its value."""
    out = bytearray()
    position = f.tell()
    for field, wire, value_start, stop in _fields(f, end):
        if field in handlers:
            handler = handlers[field]
            if handler is None:
                position = stop
                continue
            if wire == _LENGTH_DELIMITED:
                f.seek(value_start)
                inner = handler(stop)
                out += _key(field) + _varint(len(inner)) + inner
                f.seek(stop)
                position = stop
                continue
        f.seek(position)
        out += f.read(stop - position)
        position = stop
    return bytes(out)


def _read_varint(f) -> int:
    value = shift = 0
    while True:
        byte = f.read(1)
        if not byte:
            raise ValueError("the file ends inside a field")
        value |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            return value
        shift += 7
        if shift > 63:
            raise ValueError("a malformed varint")
