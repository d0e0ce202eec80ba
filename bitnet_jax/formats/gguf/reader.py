"""A strict GGUF container parser over a memory map (bitnet-spec §2.0).

We parse GGUF ourselves rather than use `gguf.GGUFReader` because (a) upstream's enum rejects
bitnet.cpp's I2_S (type id 36, spec §2.2.1), whose meaning depends on the file's origin, and
(b) a hostile or truncated header must raise one clear GGUFError, quickly, without allocating
more than the file could possibly describe.

Every count and length read from the header is checked against the bytes that remain before it
is used, so an absurd tensor count, KV count, array length or string length fails at once. The
parsed header is plain Python: `GGUFFile.metadata` maps key -> value (str, int, float, bool or a
list of those, nested for arrays of arrays) and `GGUFFile.tensors` maps name -> TensorInfo.
Tensor data is read lazily through a per-tensor `np.memmap` (`GGUFFile.tensor_bytes`), which is
dropped after use so the loader's resident memory never holds the whole file.

Layout of a file (all little-endian):

  magic "GGUF" | version u32 (2 or 3) | n_tensors u64 | n_kv u64
  n_kv × (key: u64 len + bytes, value type u32, value)
  n_tensors × (name, n_dims u32, ne[n_dims] u64 with ne0 innermost, ggml type u32, offset u64)
  padding to `general.alignment` (default 32) | tensor data (offsets relative to here)
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

from bitnet_jax.errors import GGUFError
from bitnet_jax.formats.gguf.constants import (  # noqa: F401 (re-exported for the writer)
    UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64,
    FLOAT64, VALUE_TYPE_NAMES, SCALAR_FORMATS, SCALAR_DTYPES, GGML_TYPES, TYPE_IDS, I2_S,
    I2_S_BLOCK, I2_S_TAIL, BITNET_CPP_ARCHS)

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
# Limits far above any real model file (the largest arrays are ~300k tokenizer merges); they
# bound the Python objects a hostile header can make us build.
MAX_ARRAY_ELEMENTS = 1 << 23
MAX_TOTAL_ARRAY_ELEMENTS = 1 << 24
MAX_NESTING = 8
MAX_NAME_BYTES = 1 << 16
MAX_TENSORS = 1 << 20

@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF file.

    Attributes:
      name: GGUF tensor name, e.g. "blk.0.attn_q.weight".
      shape: numpy order (outermost first), i.e. reversed ggml `ne`; a linear weight is (O, I).
      type_id: ggml type id as stored in the file.
      type_name: resolved type name ("F16", "TQ2_0", "I2_S", ...).
      offset: absolute byte offset of the data in the file.
      nbytes: byte size of the data.
    """

    name: str
    shape: tuple[int, ...]
    type_id: int
    type_name: str
    offset: int
    nbytes: int

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


@dataclasses.dataclass
class GGUFFile:
    """A parsed GGUF header plus lazy access to tensor data.

    Attributes:
      path: the file.
      version: GGUF version (2 or 3).
      metadata: key -> plain Python value (arrays as lists).
      value_types: key -> GGUF value type id, and for arrays (ARRAY, element type id), so a
        writer can reproduce the exact types.
      tensors: name -> TensorInfo, in file order.
      alignment: data alignment in bytes.
      data_start: absolute offset of the tensor data section.
      file_size: size of the file in bytes.
    """

    path: Path
    version: int
    metadata: dict[str, Any]
    value_types: dict[str, Any]
    tensors: dict[str, TensorInfo]
    alignment: int
    data_start: int
    file_size: int

    @property
    def architecture(self) -> str | None:
        arch = self.metadata.get("general.architecture")
        return arch if isinstance(arch, str) else None

    def tensor_bytes(self, info: TensorInfo) -> np.ndarray:
        """The raw bytes of one tensor as a read-only uint8 memmap [nbytes].

        A fresh map per tensor: dropping the returned array unmaps it, so pages already read do
        not stay in the process's resident set for the rest of the load.
        """
        if info.nbytes == 0:
            return np.zeros(0, np.uint8)
        return np.memmap(self.path, dtype=np.uint8, mode="r", offset=info.offset,
                         shape=(info.nbytes,))


class _Cursor:
    """Bounds-checked little-endian reads over the file's bytes."""

    def __init__(self, buf, size: int, path: Path):
        self.buf, self.size, self.pos, self.path = buf, size, 0, path
        self.array_elements = 0

    def fail(self, what: str) -> GGUFError:
        return GGUFError(f"{self.path} is not a valid GGUF file: {what}; re-download or "
                         "re-convert it.")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise GGUFError(f"{self.path} is truncated: {what} at byte {self.pos} needs {n} "
                            f"bytes but only {self.size - self.pos} remain; re-download or "
                            "re-convert it.")

    def scalar(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def string(self, what: str, limit: int | None = None) -> str:
        n = self.scalar("<Q", f"length of {what}")
        if limit is not None and n > limit:
            raise self.fail(f"{what} is {n} bytes long (limit {limit})")
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        # surrogateescape: token strings that are not valid UTF-8 survive a read/write round trip.
        return raw.decode("utf-8", errors="surrogateescape")


def _min_size(vtype: int) -> int:
    """Fewest bytes one value of this type can occupy (for up-front array length checks)."""
    if vtype == STRING:
        return 8
    if vtype == ARRAY:
        return 12
    return struct.calcsize(SCALAR_FORMATS[vtype])


def _read_value(cur: _Cursor, vtype: int, key: str, depth: int = 0):
    """Read one value; returns (python value, type descriptor)."""
    if vtype in SCALAR_FORMATS:
        value = cur.scalar(SCALAR_FORMATS[vtype], f"value of {key!r}")
        if vtype == BOOL:
            value = bool(value)
        elif vtype == FLOAT32:
            # The shortest decimal that round-trips the float32 (1e-05, not 9.99999974e-06), so
            # a config read back from GGUF equals the one written.
            value = float(str(np.float32(value)))
        return value, vtype
    if vtype == STRING:
        return cur.string(f"value of {key!r}"), STRING
    if vtype == ARRAY:
        if depth >= MAX_NESTING:
            raise cur.fail(f"key {key!r} nests arrays more than {MAX_NESTING} deep")
        etype = cur.scalar("<I", f"array type of {key!r}")
        if etype >= len(VALUE_TYPE_NAMES):
            raise cur.fail(f"key {key!r} has unknown array element type {etype}")
        count = cur.scalar("<Q", f"array length of {key!r}")
        if count > MAX_ARRAY_ELEMENTS:
            raise cur.fail(f"key {key!r} claims {count} array elements (limit "
                           f"{MAX_ARRAY_ELEMENTS})")
        cur.need(count * _min_size(etype), f"{count} array elements of {key!r}")
        cur.array_elements += count
        if cur.array_elements > MAX_TOTAL_ARRAY_ELEMENTS:
            raise cur.fail(f"the metadata holds more than {MAX_TOTAL_ARRAY_ELEMENTS} array "
                           "elements")
        if etype in SCALAR_DTYPES:
            dtype = np.dtype(SCALAR_DTYPES[etype])
            arr = np.frombuffer(cur.buf, dtype=dtype, count=count, offset=cur.pos)
            cur.pos += count * dtype.itemsize
            values = arr.astype(bool).tolist() if etype == BOOL else arr.tolist()
            return values, (ARRAY, etype)
        if etype == STRING:
            return _read_strings(cur, count, key), (ARRAY, STRING)
        values, sub = [], etype
        for _ in range(count):
            v, sub = _read_value(cur, etype, key, depth + 1)
            values.append(v)
        return values, (ARRAY, sub)
    raise cur.fail(f"key {key!r} has unknown value type {vtype}")


def _read_strings(cur: _Cursor, count: int, key: str) -> list[str]:
    """An array of strings (the hot path: 128k tokens and 280k merges in llama3 files)."""
    buf, pos, size = cur.buf, cur.pos, cur.size
    unpack = struct.Struct("<Q").unpack_from
    out = []
    append = out.append
    for _ in range(count):
        if pos + 8 > size:
            cur.pos = pos
            cur.need(8, f"string length in {key!r}")
        (n,) = unpack(buf, pos)
        pos += 8
        if n > size - pos:
            cur.pos = pos
            cur.need(n, f"string in {key!r}")
        append(str(buf[pos:pos + n], "utf-8", "surrogateescape"))
        pos += n
    cur.pos = pos
    return out


def _resolve_type(tid: int, arch: str | None, name: str, cur: _Cursor) -> tuple[str, int, int]:
    """(type name, block size, type size) for a tensor's ggml type id in this file."""
    bitnet_file = arch in BITNET_CPP_ARCHS
    if tid == I2_S:
        # Upstream ggml never writes 36 (a removed IQ4_NL_4_4 id); decided per file below.
        return "I2_S", 1, 1
    if bitnet_file and tid in (37, 38, 39):
        kind = {37: "I8_S", 38: "TL1", 39: "TL2"}[tid]
        raise GGUFError(
            f"{cur.path}: tensor {name!r} uses bitnet.cpp's {kind} layout, which is tied to "
            "bitnet.cpp's generated kernels; re-convert the model with --type i2_s or tq2_0."
        )
    if tid not in GGML_TYPES:
        raise GGUFError(f"{cur.path}: tensor {name!r} has unknown ggml type id {tid}; this "
                        "GGUF was written by a tool bitnet_jax does not know.")
    return GGML_TYPES[tid]


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse and validate a GGUF header (tensor data stays on disk).

    Args:
      path: a .gguf file.

    Returns:
      GGUFFile.

    Raises:
      GGUFError: bad magic, unsupported version, truncation, absurd counts or lengths,
        unknown value or tensor types, tensor data outside the file or overlapping.
    """
    path = Path(path)
    try:
        size = os.path.getsize(path)
        f = open(path, "rb")
    except OSError as exc:
        raise GGUFError(f"cannot open GGUF file {path} ({exc.strerror}).") from None
    with f:
        if size < 4:
            raise GGUFError(f"{path} is too short to be a GGUF file ({size} bytes).")
        if f.read(4) != GGUF_MAGIC:
            raise GGUFError(f"{path} is not a GGUF file (it does not start with b'GGUF').")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return _parse(mm, size, path)


def _parse(buf, size: int, path: Path) -> GGUFFile:
    cur = _Cursor(buf, size, path)
    cur.pos = 4
    version = cur.scalar("<I", "version")
    if version not in (2, 3):
        if version in (0x02000000, 0x03000000):
            raise GGUFError(f"{path} is a big-endian GGUF; bitnet_jax reads little-endian files "
                            "only: re-convert it without --bigendian.")
        raise GGUFError(f"{path} has GGUF version {version}; bitnet_jax reads versions 2 and 3: "
                        "re-convert it with a current converter.")
    n_tensors = cur.scalar("<Q", "tensor count")
    n_kv = cur.scalar("<Q", "metadata count")
    # Each KV takes at least 13 bytes (empty key, type, 1-byte value); each tensor info 24.
    if n_kv * 13 > size - cur.pos:
        raise cur.fail(f"the header claims {n_kv} metadata entries, more than the file can hold")
    if n_tensors > MAX_TENSORS or n_tensors * 24 > size - cur.pos:
        raise cur.fail(f"the header claims {n_tensors} tensors, more than the file can hold")

    metadata: dict[str, Any] = {}
    value_types: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string("metadata key", MAX_NAME_BYTES)
        if key in metadata:
            raise cur.fail(f"metadata key {key!r} appears twice")
        vtype = cur.scalar("<I", f"value type of {key!r}")
        if vtype >= len(VALUE_TYPE_NAMES):
            raise cur.fail(f"key {key!r} has unknown value type {vtype}")
        metadata[key], value_types[key] = _read_value(cur, vtype, key)

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if (isinstance(alignment, bool) or not isinstance(alignment, int) or alignment <= 0
            or alignment & (alignment - 1) or alignment > 1 << 20):
        raise cur.fail(f"general.alignment={alignment!r} is not a power of two")
    arch = metadata.get("general.architecture")
    arch = arch if isinstance(arch, str) else None

    raw_infos = []
    names = set()
    for _ in range(n_tensors):
        name = cur.string("tensor name", MAX_NAME_BYTES)
        if name in names:
            raise cur.fail(f"tensor {name!r} appears twice")
        names.add(name)
        n_dims = cur.scalar("<I", f"dimension count of {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cur.fail(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
        ne = [cur.scalar("<Q", f"shape of {name!r}") for _ in range(n_dims)]
        if any(n >= 1 << 62 for n in ne) or int(np.prod(ne, dtype=object)) >= 1 << 62:
            raise cur.fail(f"tensor {name!r} has an absurd shape {ne}")
        tid = cur.scalar("<I", f"type of {name!r}")
        offset = cur.scalar("<Q", f"data offset of {name!r}")
        raw_infos.append((name, ne, tid, offset))
    data_start = -(-cur.pos // alignment) * alignment

    tensors: dict[str, TensorInfo] = {}
    i2s_names = []
    for name, ne, tid, offset in raw_infos:
        type_name, block, type_size = _resolve_type(tid, arch, name, cur)
        n = int(np.prod(ne, dtype=object))
        if type_name == "I2_S":
            if n % I2_S_BLOCK:
                raise cur.fail(f"I2_S tensor {name!r} has {n} values, not a multiple of "
                               f"{I2_S_BLOCK}")
            nbytes = n // 4 + I2_S_TAIL
            i2s_names.append(name)
        else:
            if ne[0] % block:
                raise cur.fail(f"tensor {name!r} has rows of {ne[0]} values, not a multiple of "
                               f"the {type_name} block size {block}")
            nbytes = n // block * type_size
        if offset % alignment:
            raise cur.fail(f"tensor {name!r} has data offset {offset}, not a multiple of the "
                           f"alignment {alignment}")
        if data_start + offset + nbytes > size:
            raise GGUFError(f"{path} is truncated: the data of tensor {name!r} ends at byte "
                            f"{data_start + offset + nbytes} but the file has {size} bytes; "
                            "re-download or re-convert it.")
        tensors[name] = TensorInfo(name, tuple(reversed(ne)), tid, type_name,
                                   data_start + offset, nbytes)

    by_offset = sorted(tensors.values(), key=lambda t: t.offset)
    for a, b in zip(by_offset, by_offset[1:]):
        if a.offset + a.nbytes > b.offset:
            if a.type_name == "I2_S":
                raise cur.fail(f"type id 36 of tensor {a.name!r} does not have bitnet.cpp's "
                               "I2_S size n/4+32 (it overlaps the next tensor), so its meaning "
                               "is unknown")
            raise cur.fail(f"the data of tensors {a.name!r} and {b.name!r} overlap")
    if i2s_names and arch not in BITNET_CPP_ARCHS:
        # Type 36 outside bitnet.cpp's own architectures (e.g. a Falcon3 `llama` conversion):
        # accept it as I2_S only when the tensor sizes fit n/4+32 exactly, i.e. each I2_S
        # tensor ends where the next one starts (spec §2.2.1: decide by origin, not id).
        following = {a.name: b for a, b in zip(by_offset, by_offset[1:])}
        for name in i2s_names:
            t, nxt = tensors[name], following.get(name)
            end = -(-(t.offset + t.nbytes) // alignment) * alignment
            if nxt is not None and nxt.offset != end:
                raise cur.fail(f"tensor {name!r} has type id 36 but its size does not match "
                               "bitnet.cpp's I2_S (n/4+32 bytes), so its meaning is unknown")
    return GGUFFile(path, version, metadata, value_types, tensors, alignment, data_start, size)
