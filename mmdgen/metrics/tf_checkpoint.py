"""Read TensorFlow V2 checkpoints ("tensor bundles") with neither TensorFlow nor protobuf installed.

A checkpoint saved to ``PREFIX`` is two kinds of file:

``PREFIX.index``                  an SSTable (the LevelDB table format) mapping each variable name to
                                  a ``BundleEntryProto``: dtype, shape, shard, byte offset, byte size
                                  and the masked CRC-32C of the bytes; the empty key holds a
                                  ``BundleHeaderProto`` (number of shards, byte order).
``PREFIX.data-00000-of-0000N``    the raw little-endian tensor bytes, one file per shard.

The SSTable is: data blocks, a metaindex block, an index block, then a 48-byte footer (two block
handles, zero padding, an 8-byte magic number). Every block is followed by a 5-byte trailer: a
compression byte (TensorFlow writes bundles uncompressed; snappy blocks are refused) and the masked
CRC-32C of the block plus that byte. Block entries share key prefixes with the entry before them;
the restart array at a block's end only serves binary search and is skipped by a sequential read.

The few protobuf fields needed are decoded by hand (varints and wire types). Every block and every
tensor is checked against its CRC-32C; the CRC runs vectorised in numpy (reading and checking the
9 MB musicnn checkpoint takes under half a second). Only whole numeric tensors are supported:
string tensors and partitioned (sliced) variables raise ``CheckpointError``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_BYTES = 48  # two block handles padded to 40 bytes, then the 8-byte magic
BLOCK_TRAILER_BYTES = 5  # compression type byte + masked crc32c
NO_COMPRESSION, SNAPPY_COMPRESSION = 0, 1
HEADER_KEY = ""  # the bundle header's key sorts first

# TensorFlow DataType enum values (tensorflow/core/framework/types.proto) this reader supports.
TF_DTYPES = {
    1: torch.float32, 2: torch.float64, 3: torch.int32, 4: torch.uint8, 5: torch.int16, 6: torch.int8,
    9: torch.int64, 10: torch.bool, 14: torch.bfloat16, 19: torch.float16,
}
TF_DTYPE_NAMES = {1: "float", 2: "double", 3: "int32", 4: "uint8", 5: "int16", 6: "int8", 7: "string",
                  8: "complex64", 9: "int64", 10: "bool", 14: "bfloat16", 17: "uint16", 18: "complex128",
                  19: "half", 20: "resource", 21: "variant", 22: "uint32", 23: "uint64"}


class CheckpointError(ValueError):
    """A checkpoint file that is truncated, corrupt, or uses a feature this reader does not support."""


@dataclass(frozen=True)
class BundleEntry:
    """Where one tensor lives: ``size`` bytes at ``offset`` in data shard ``shard_id``."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    shard_id: int
    offset: int
    size: int
    masked_crc32c: int


# --------------------------------------------------------------------------------------------
# CRC-32C (Castagnoli), as TensorFlow and LevelDB use it

_CRC_POLYNOMIAL = 0x82F63B78  # reflected Castagnoli polynomial
_CRC_ROW = 1024  # bytes per row of the vectorised CRC
_CRC_MASK_DELTA = 0xA282EAD8


@lru_cache(maxsize=None)
def _crc_tables() -> tuple[np.ndarray, list[list[int]]]:
    """(byte table, tables of the linear map "feed _CRC_ROW zero bytes" per byte lane of the state)."""
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ np.uint32(_CRC_POLYNOMIAL), table >> 1).astype(np.uint32)
    lanes = (np.arange(256, dtype=np.uint32)[None, :] << (8 * np.arange(4, dtype=np.uint32)[:, None])).ravel()
    for _ in range(_CRC_ROW):
        lanes = table[lanes & 0xFF] ^ (lanes >> 8)
    return table, lanes.reshape(4, 256).tolist()


def crc32c(data: bytes | bytearray | memoryview) -> int:
    """CRC-32C of ``data`` (crc32c(b"123456789") == 0xE3069283).

    A byte-at-a-time Python loop would take seconds for a checkpoint, so the bytes are cut into rows
    of ``_CRC_ROW`` whose CRCs are computed together in numpy and then chained: the CRC register is
    linear over GF(2), so the register after row k is (register after row k-1, advanced over a row
    of zeros) XOR (row k's own CRC from a zero register). The initial register 0xFFFFFFFF is the
    same as a zero register with the first four bytes complemented, and zero bytes in front of a
    zero register leave it zero, which lets the data be left-padded to whole rows.
    """
    table, advance = _crc_tables()
    data = np.frombuffer(data, dtype=np.uint8)
    if data.size < 4:
        register = 0xFFFFFFFF
        for byte in data.tolist():
            register = int(table[(register ^ byte) & 0xFF]) ^ (register >> 8)
        return register ^ 0xFFFFFFFF
    rows = -(-data.size // _CRC_ROW)
    padding = rows * _CRC_ROW - data.size
    padded = np.zeros(rows * _CRC_ROW, dtype=np.uint8)
    padded[padding:] = data
    padded[padding: padding + 4] ^= 0xFF
    block = padded.reshape(rows, _CRC_ROW).astype(np.uint32)
    row_crcs = np.zeros(rows, dtype=np.uint32)
    for column in range(_CRC_ROW):
        row_crcs = table[(row_crcs ^ block[:, column]) & 0xFF] ^ (row_crcs >> 8)
    lane0, lane1, lane2, lane3 = advance
    register = 0
    for row_crc in row_crcs.tolist():
        register = (lane0[register & 0xFF] ^ lane1[(register >> 8) & 0xFF] ^ lane2[(register >> 16) & 0xFF]
                    ^ lane3[register >> 24] ^ row_crc)
    return register ^ 0xFFFFFFFF


def mask_crc32c(crc: int) -> int:
    """The masked form TensorFlow stores (a CRC of data that itself holds CRCs is then not degenerate)."""
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _CRC_MASK_DELTA) & 0xFFFFFFFF


# --------------------------------------------------------------------------------------------
# Protobuf wire format: just enough to read the bundle's messages


def read_varint(buffer: bytes, position: int, where: str) -> tuple[int, int]:
    """(value, position after it) of the base-128 varint at ``position``; ``where`` names the source."""
    value, shift = 0, 0
    while True:
        if position >= len(buffer):
            raise CheckpointError(f"{where}: varint runs past the end of its buffer")
        byte = buffer[position]
        value |= (byte & 0x7F) << shift
        position += 1
        if byte < 0x80:
            return value, position
        shift += 7
        if shift >= 64:
            raise CheckpointError(f"{where}: varint longer than 10 bytes")


def parse_protobuf(buffer: bytes, where: str) -> list[tuple[int, int | bytes]]:
    """(field number, value) of every field of a protobuf message, in order.

    Varints (wire type 0) come back as ints, fixed64 / fixed32 (1 / 5) as little-endian unsigned
    ints, length-delimited fields (2) as bytes; groups (3, 4) are refused.
    """
    fields = []
    position = 0
    while position < len(buffer):
        key, position = read_varint(buffer, position, where)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, position = read_varint(buffer, position, where)
        elif wire_type in (1, 5):
            width = 8 if wire_type == 1 else 4
            if position + width > len(buffer):
                raise CheckpointError(f"{where}: fixed-width field {number} runs past the end of its message")
            value = int.from_bytes(buffer[position: position + width], "little")
            position += width
        elif wire_type == 2:
            length, position = read_varint(buffer, position, where)
            if position + length > len(buffer):
                raise CheckpointError(f"{where}: field {number} of {length} bytes runs past the end of its message")
            value = bytes(buffer[position: position + length])
            position += length
        else:
            raise CheckpointError(f"{where}: unsupported protobuf wire type {wire_type} (field {number})")
        fields.append((number, value))
    return fields


def _signed64(value: int) -> int:
    # int64 fields are varints of the two's-complement bit pattern (an unknown dim is -1).
    return value - (1 << 64) if value >= 1 << 63 else value


def _tensor_shape(message: bytes, where: str) -> tuple[int, ...]:
    """TensorShapeProto: repeated ``dim`` (2) of Dim {size (1)}; ``unknown_rank`` (3)."""
    shape = []
    for number, value in parse_protobuf(message, where):
        if number == 2:
            size = next((_signed64(v) for n, v in parse_protobuf(value, where) if n == 1), 0)
            if size < 0:
                raise CheckpointError(f"{where}: the shape has an unknown dimension ({size})")
            shape.append(size)
        elif number == 3 and value:
            raise CheckpointError(f"{where}: the shape has unknown rank")
    return tuple(shape)


def _bundle_entry(name: str, message: bytes, where: str) -> BundleEntry:
    """BundleEntryProto: dtype 1, shape 2, shard_id 3, offset 4, size 5, crc32c 6 (fixed32), slices 7."""
    dtype = shard_id = offset = size = crc = 0
    shape: tuple[int, ...] = ()
    where = f"{where}: entry {name!r}"
    for number, value in parse_protobuf(message, where):
        if number == 1:
            dtype = value
        elif number == 2:
            shape = _tensor_shape(value, where)
        elif number == 3:
            shard_id = value
        elif number == 4:
            offset = value
        elif number == 5:
            size = value
        elif number == 6:
            crc = value
        elif number == 7:
            raise CheckpointError(f"{where}: a partitioned (sliced) variable, which this reader does not support")
    if dtype not in TF_DTYPES:
        supported = ", ".join(TF_DTYPE_NAMES[code] for code in TF_DTYPES)
        raise CheckpointError(
            f"{where}: unsupported dtype {TF_DTYPE_NAMES.get(dtype, 'unknown')} (enum {dtype}); "
            f"supported: {supported}"
        )
    expected = math.prod(shape) * TF_DTYPES[dtype].itemsize
    if size != expected:
        raise CheckpointError(f"{where}: {size} bytes stored for shape {list(shape)}, expected {expected}")
    return BundleEntry(name, TF_DTYPES[dtype], shape, shard_id, offset, size, crc)


# --------------------------------------------------------------------------------------------
# The SSTable


def _block_handle(buffer: bytes, position: int, where: str) -> tuple[int, int, int]:
    """(offset, size, position after) of a BlockHandle: two varints."""
    offset, position = read_varint(buffer, position, where)
    size, position = read_varint(buffer, position, where)
    return offset, size, position


def _read_block(table: bytes, offset: int, size: int, where: str) -> bytes:
    """The contents of the block at ``offset``, its trailer checked."""
    end = offset + size + BLOCK_TRAILER_BYTES
    if end > len(table):
        raise CheckpointError(f"{where}: block at {offset} (+{size} bytes) runs past the end of the "
                              f"{len(table)}-byte file; the file is truncated")
    contents = table[offset: offset + size]
    compression = table[offset + size]
    stored = int.from_bytes(table[offset + size + 1: end], "little")
    if mask_crc32c(crc32c(table[offset: offset + size + 1])) != stored:
        raise CheckpointError(f"{where}: block at {offset} fails its CRC-32C check; the file is corrupt")
    if compression == SNAPPY_COMPRESSION:
        raise CheckpointError(f"{where}: block at {offset} is snappy-compressed, which this reader does "
                              "not support (TensorFlow writes bundles uncompressed)")
    if compression != NO_COMPRESSION:
        raise CheckpointError(f"{where}: block at {offset} has unknown compression type {compression}")
    return contents


def _block_entries(block: bytes, where: str) -> list[tuple[bytes, bytes]]:
    """(key, value) pairs of a block; each key shares a prefix with the key before it."""
    if len(block) < 4:
        raise CheckpointError(f"{where}: block of {len(block)} bytes is too short for its restart count")
    restarts = int.from_bytes(block[-4:], "little")
    end = len(block) - 4 - 4 * restarts
    if end < 0:
        raise CheckpointError(f"{where}: block claims {restarts} restart points, more than fit in it")
    entries, key, position = [], b"", 0
    while position < end:
        shared, position = read_varint(block, position, where)
        unshared, position = read_varint(block, position, where)
        value_size, position = read_varint(block, position, where)
        if shared > len(key) or position + unshared + value_size > end:
            raise CheckpointError(f"{where}: malformed block entry at byte {position}")
        key = key[:shared] + block[position: position + unshared]
        position += unshared
        entries.append((key, block[position: position + value_size]))
        position += value_size
    return entries


def read_table(path: str | Path) -> list[tuple[bytes, bytes]]:
    """Every (key, value) of an SSTable file, in key order."""
    path = Path(path)
    table = path.read_bytes()
    where = str(path)
    if len(table) < FOOTER_BYTES:
        raise CheckpointError(f"{where}: {len(table)} bytes is shorter than the {FOOTER_BYTES}-byte SSTable "
                              "footer; the file is truncated or not a checkpoint index")
    footer = table[-FOOTER_BYTES:]
    magic = int.from_bytes(footer[-8:], "little")
    if magic != TABLE_MAGIC:
        raise CheckpointError(f"{where}: bad magic number {magic:#018x} at the end of the file, expected "
                              f"{TABLE_MAGIC:#018x}; the file is truncated or not a checkpoint index")
    _, _, position = _block_handle(footer, 0, f"{where} (footer)")  # the metaindex block: empty in bundles
    index_offset, index_size, _ = _block_handle(footer, position, f"{where} (footer)")
    if index_offset + index_size + BLOCK_TRAILER_BYTES > len(table) - FOOTER_BYTES:
        raise CheckpointError(f"{where}: bad footer: index block at {index_offset} (+{index_size} bytes) "
                              "overlaps the footer or lies past the end of the file")
    entries = []
    for _, handle in _block_entries(_read_block(table, index_offset, index_size, where), where):
        offset, size, _ = _block_handle(handle, 0, where)
        entries.extend(_block_entries(_read_block(table, offset, size, where), where))
    return entries


# --------------------------------------------------------------------------------------------
# The tensor bundle


def bundle_file(prefix: str | Path, suffix: str) -> Path:
    """The checkpoint file ``PREFIX + suffix``, e.g. suffix ``.index``.

    A prefix that is a directory is a checkpoint saved to ``DIR/`` (musicnn's are): its files are
    ``DIR/.index`` and ``DIR/.data-*``.
    """
    prefix = Path(prefix)
    if prefix.is_dir():
        return prefix / suffix
    return prefix.parent / f"{prefix.name}{suffix}"


def read_index(prefix: str | Path) -> tuple[int, dict[str, BundleEntry]]:
    """(number of data shards, entries by tensor name) of the checkpoint at ``prefix``."""
    index_path = bundle_file(prefix, ".index")
    if not index_path.is_file():
        raise FileNotFoundError(f"checkpoint index {index_path} not found")
    where = str(index_path)
    num_shards, entries = None, {}
    for key, value in read_table(index_path):
        name = key.decode("utf-8")
        if name == HEADER_KEY:
            # BundleHeaderProto: num_shards 1, endianness 2 (0 = little), version 3.
            header = dict(parse_protobuf(value, f"{where}: header"))
            if header.get(2, 0) != 0:
                raise CheckpointError(f"{where}: big-endian bundle; only little-endian bundles are supported")
            num_shards = header.get(1, 0)
        else:
            entries[name] = _bundle_entry(name, value, where)
    if num_shards is None:
        raise CheckpointError(f"{where}: no bundle header (empty key); not a TensorFlow V2 checkpoint index")
    for entry in entries.values():
        if not 0 <= entry.shard_id < num_shards:
            raise CheckpointError(f"{where}: entry {entry.name!r} is in shard {entry.shard_id} "
                                  f"but the header declares {num_shards} shard(s)")
    return num_shards, entries


def read_checkpoint(prefix: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the TensorFlow V2 checkpoint at ``prefix`` (the path given to ``Saver.save``,
    without ``.index``), by variable name, with the dtype and shape the index states.

    Each tensor's bytes are checked against the CRC-32C stored in the index.
    """
    num_shards, entries = read_index(prefix)
    tensors = {}
    by_shard: dict[int, list[BundleEntry]] = {}
    for entry in entries.values():
        by_shard.setdefault(entry.shard_id, []).append(entry)
    for shard_id, shard_entries in sorted(by_shard.items()):
        path = bundle_file(prefix, f".data-{shard_id:05d}-of-{num_shards:05d}")
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint data shard {path} not found")
        data = path.read_bytes()
        for entry in shard_entries:
            if entry.offset + entry.size > len(data):
                raise CheckpointError(f"{path}: tensor {entry.name!r} needs bytes {entry.offset}..."
                                      f"{entry.offset + entry.size} but the file has {len(data)}; it is truncated")
            raw = data[entry.offset: entry.offset + entry.size]
            if mask_crc32c(crc32c(raw)) != entry.masked_crc32c:
                raise CheckpointError(f"{path}: tensor {entry.name!r} fails its CRC-32C check; the file is corrupt")
            tensors[entry.name] = _tensor(raw, entry)
    return tensors


def _tensor(raw: bytes, entry: BundleEntry) -> torch.Tensor:
    if entry.size == 0:
        return torch.zeros(entry.shape, dtype=entry.dtype)
    return torch.frombuffer(bytearray(raw), dtype=entry.dtype).reshape(entry.shape)

