"""Check a GGUF file's header before anything else parses it.

``gguf.GGUFReader`` (which transformers uses) trusts every count and length it reads: a
declared 2^62-byte string or 2^60 array items makes it loop over empty slices while its
lists grow, and a truncated or scrambled file ends in an ``IndexError`` or
``UnicodeDecodeError`` from deep inside. This walks the header once with ``struct`` over a
memory map, checking every length and count against the bytes that remain before using
it, every string as UTF-8, every tensor's extent against the file, and the model sizes
the metadata declares against the tensors. A file that passes parses; one that does not
raises :class:`GGUFHeaderError` with one line naming the byte where it went wrong.
"""

from __future__ import annotations

import mmap
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_DEPTH = 4
MAX_KEY_BYTES = 1 << 16
# GGUFValueType: the byte width of each scalar type; 8 is STRING, 9 is ARRAY.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9
_BLOCK = re.compile(r"^blk\.(\d+)\.")


class GGUFHeaderError(ValueError):
    """The file is not a GGUF this tool can read; the message is one line."""


@dataclass
class GGUFTensor:
    name: str
    dims: tuple[int, ...]  # GGUF order: dims[0] is the innermost (a row's length)
    ggml_type: int
    offset: int  # from the start of the data section
    nbytes: int


@dataclass
class GGUFHeader:
    """What the header holds: scalar metadata, array lengths, and the tensors."""

    version: int
    metadata: dict[str, Any] = field(default_factory=dict)  # scalars and strings
    array_lengths: dict[str, int] = field(default_factory=dict)
    tensors: dict[str, GGUFTensor] = field(default_factory=dict)
    data_offset: int = 0


def _quant_sizes() -> dict[int, tuple[int, int]]:
    """(block size, bytes per block) of each ggml type, from the gguf package."""
    from gguf import GGML_QUANT_SIZES

    return {int(k): (int(v[0]), int(v[1])) for k, v in GGML_QUANT_SIZES.items()}


class _Cursor:
    def __init__(self, buf: mmap.mmap | bytes, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def fail(self, why: str, at: int | None = None) -> GGUFHeaderError:
        return GGUFHeaderError(f"{self.path}: not a usable GGUF file: {why} "
                               f"(at byte {self.pos if at is None else at} of {len(self.buf)})")

    def remaining(self) -> int:
        return len(self.buf) - self.pos

    def unpack(self, fmt: str, what: str) -> Any:
        size = struct.calcsize(fmt)
        if size > self.remaining():
            raise self.fail(f"truncated in {what}")
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self, what: str, limit: int | None = None) -> str:
        start = self.pos
        n = self.unpack("<Q", f"the length of {what}")
        if n > self.remaining() or (limit is not None and n > limit):
            raise self.fail(f"{what} declares {n} bytes, the file has {self.remaining()} left",
                            start)
        raw = bytes(self.buf[self.pos:self.pos + n])
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8", self.pos) from None
        self.pos += n
        return text

    def skip_value(self, vtype: int, what: str, depth: int = 0) -> tuple[Any, int | None]:
        """Read or step over one value; returns (the scalar or string, the array length)."""
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype], what), None
        if vtype == STRING:
            return self.string(what), None
        if vtype != ARRAY:
            raise self.fail(f"{what} has unknown value type {vtype}")
        if depth >= MAX_ARRAY_DEPTH:
            raise self.fail(f"{what} nests arrays more than {MAX_ARRAY_DEPTH} deep")
        start = self.pos
        itype = self.unpack("<I", f"the item type of {what}")
        count = self.unpack("<Q", f"the length of {what}")
        if itype in _SCALARS:
            nbytes = count * struct.calcsize(_SCALARS[itype])
            if nbytes > self.remaining():
                raise self.fail(f"{what} declares {count} items, more than the file holds", start)
            self.pos += nbytes
            return None, count
        smallest = {STRING: 8, ARRAY: 12}.get(itype)
        if smallest is None:
            raise self.fail(f"{what} has unknown item type {itype}", start)
        if count * smallest > self.remaining():
            raise self.fail(f"{what} declares {count} items, more than the file holds", start)
        for i in range(count):
            self.skip_value(itype, f"{what}[{i}]", depth + 1)
        return None, count


def read_header(path: Path) -> GGUFHeader:
    """Parse and check ``path``'s header; :class:`GGUFHeaderError` (one line) if it is bad."""
    try:
        with path.open("rb") as fh:
            size = path.stat().st_size
            if size < 24:
                raise GGUFHeaderError(f"{path}: not a usable GGUF file: truncated at {size} "
                                      "bytes (the fixed header alone is 24)")
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse(_Cursor(buf, path))
    except OSError as exc:
        raise GGUFHeaderError(f"{path}: cannot be read: {exc.strerror or exc}") from None


def _parse(cur: _Cursor) -> GGUFHeader:
    if bytes(cur.buf[:4]) != MAGIC:
        raise cur.fail("it does not start with b'GGUF'", 0)
    cur.pos = 4
    version = cur.unpack("<I", "the version")
    if version not in SUPPORTED_VERSIONS:
        raise cur.fail(f"version {version} is not supported (only {SUPPORTED_VERSIONS}; "
                       "a big-endian file reads as a huge version)", 4)
    tensor_count = cur.unpack("<Q", "the tensor count")
    kv_count = cur.unpack("<Q", "the metadata count")
    # The smallest entry: a key-value of an empty key and a byte (13 bytes), a tensor of an
    # empty name, no dims, a type and an offset (24 bytes).
    if kv_count * 13 + tensor_count * 24 > cur.remaining():
        raise cur.fail(f"it declares {tensor_count} tensors and {kv_count} metadata entries, "
                       "more than the file could hold", 8)
    header = GGUFHeader(version=version)
    for _ in range(kv_count):
        key = cur.string("a metadata key", MAX_KEY_BYTES)
        if key in header.metadata or key in header.array_lengths:
            raise cur.fail(f"metadata key {key!r} appears twice")
        vtype = cur.unpack("<I", f"the type of {key!r}")
        value, length = cur.skip_value(vtype, repr(key))
        if length is None:
            header.metadata[key] = value
        else:
            header.array_lengths[key] = length
    sizes = _quant_sizes()
    for _ in range(tensor_count):
        name = cur.string("a tensor name", MAX_KEY_BYTES)
        if name in header.tensors:
            raise cur.fail(f"tensor {name!r} appears twice")
        n_dims = cur.unpack("<I", f"the rank of {name!r}")
        if n_dims > MAX_DIMS:
            raise cur.fail(f"tensor {name!r} declares {n_dims} dimensions (at most {MAX_DIMS})")
        dims = tuple(cur.unpack("<Q", f"the shape of {name!r}") for _ in range(n_dims))
        ggml_type = cur.unpack("<I", f"the type of {name!r}")
        offset = cur.unpack("<Q", f"the offset of {name!r}")
        if ggml_type not in sizes:
            raise cur.fail(f"tensor {name!r} has unknown type {ggml_type}")
        block, block_bytes = sizes[ggml_type]
        elements = 1
        for d in dims:
            elements *= d
        if dims and dims[0] % block:
            raise cur.fail(f"tensor {name!r}: rows of {dims[0]} are not whole blocks of {block}")
        header.tensors[name] = GGUFTensor(name, dims, ggml_type, offset,
                                          elements // block * block_bytes)
    alignment = header.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):
        raise cur.fail(f"general.alignment {alignment!r} is not a power of two")
    if not header.tensors:
        raise cur.fail("it holds no tensors (a vocabulary-only file is not a model)")
    if not isinstance(header.metadata.get("general.architecture"), str):
        raise cur.fail("general.architecture is missing: which model it is cannot be known")
    header.data_offset = -(-cur.pos // alignment) * alignment
    body = len(cur.buf) - header.data_offset
    for t in header.tensors.values():
        if t.offset + t.nbytes > body:
            raise cur.fail(f"truncated: tensor {t.name!r} ends at byte "
                           f"{header.data_offset + t.offset + t.nbytes}", header.data_offset)
    _check_sizes(header, cur)
    return header


def _check_sizes(header: GGUFHeader, cur: _Cursor) -> None:
    """The model sizes the metadata declares must be the tensors' own: a model built from
    a lying ``embedding_length`` fails to load, or loads as something else."""
    arch = header.metadata.get("general.architecture")
    if not isinstance(arch, str):
        return
    meta, tensors = header.metadata, header.tensors

    def declared(key: str) -> int | None:
        value = meta.get(f"{arch}.{key}")
        return value if type(value) is int else None

    problems = []
    embd = tensors.get("token_embd.weight")
    hidden = declared("embedding_length")
    if embd is not None and len(embd.dims) == 2:
        if hidden is not None and embd.dims[0] != hidden:
            problems.append(f"{arch}.embedding_length is {hidden} but token_embd.weight rows "
                            f"are {embd.dims[0]} wide")
        vocab = header.array_lengths.get("tokenizer.ggml.tokens")
        if vocab is not None and embd.dims[1] != vocab:
            problems.append(f"the vocabulary has {vocab} tokens but token_embd.weight has "
                            f"{embd.dims[1]} rows")
        size = declared("vocab_size")
        if size is not None and embd.dims[1] != size:
            problems.append(f"{arch}.vocab_size is {size} but token_embd.weight has "
                            f"{embd.dims[1]} rows")
    blocks = {int(m.group(1)) for name in tensors if (m := _BLOCK.match(name))}
    count = declared("block_count")
    if blocks and count is not None and count != len(blocks):
        problems.append(f"{arch}.block_count is {count} but the tensors hold {len(blocks)} "
                        "blocks")
    ffn, up = declared("feed_forward_length"), tensors.get("blk.0.ffn_up.weight")
    if ffn is not None and up is not None and len(up.dims) == 2 and up.dims[1] != ffn:
        problems.append(f"{arch}.feed_forward_length is {ffn} but blk.0.ffn_up.weight has "
                        f"{up.dims[1]} rows")
    heads = declared("attention.head_count")
    if heads is not None and hidden is not None and (heads <= 0 or hidden % heads):
        problems.append(f"{arch}.attention.head_count {heads} does not divide "
                        f"embedding_length {hidden}")
    if problems:
        raise GGUFHeaderError(f"{cur.path}: the metadata does not match the weights: "
                              + "; ".join(problems))


__all__ = ["GGUFHeader", "GGUFHeaderError", "GGUFTensor", "read_header"]
