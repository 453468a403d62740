"""Read a GGUF file once, at numpy's speed, while transformers converts it.

Converting the embedded model (``lie-detector model prepare``) spent most of its non-torch time
in ``gguf.GGUFReader``: transformers opens the file three times (config, tokenizer, weights) and
:func:`detector.models.importer.gguf_token_flags` a fourth, and every opening walks each metadata
element on its own: SmolLM2's 49,152 tokens and 48,900 merges are about 400,000 small slices.
The reader slices an ``np.memmap``, whose ``__getitem__`` and ``__array_finalize__`` run in
Python for every slice (about 80 % of the reader's time in the profile). transformers also
builds gguf's tensor-name map, the same one, for each of the model's ~400 submodules.

Inside :func:`gguf_read_once`, ``gguf.GGUFReader(path)`` returns one reader per file, parsed by
gguf's own code over a plain array view of the same read-only mapping (slices in C), and
``gguf.get_tensor_name_map`` returns one map per (architecture, layer count). The bytes and the
parsing code are the same, so the config, tokenizer and tensors are too (tests pin this); the
hostile-file checks of :mod:`detector.models.gguf_header` still run first, as before.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Iterator
from typing import Any

# One patch at a time: the module attributes are process-wide.
_PATCH_LOCK = threading.RLock()


def plain_array_reader_class() -> type:
    """``gguf.GGUFReader`` over a plain ``ndarray`` view of its memory map instead of the
    ``np.memmap`` itself: the same parser, without numpy's Python-level memmap hooks per slice.

    The view shares the mapping (its ``base`` keeps it open) and stays read-only.
    """
    import numpy as np
    from gguf.gguf_reader import GGUFReader  # the class itself, even inside gguf_read_once

    class PlainArrayGGUFReader(GGUFReader):
        @property
        def data(self) -> Any:
            return self._plain_data

        @data.setter
        def data(self, value: Any) -> None:
            self._plain_data = np.asarray(value)

    return PlainArrayGGUFReader


@contextlib.contextmanager
def gguf_read_once() -> Iterator[dict[tuple[str, str], Any]]:
    """Within the block, each GGUF file is parsed once (fast) and shared by every reader of it.

    Yields the cache (resolved path and mode -> reader), which tests inspect. Readers are
    dropped, and the memory maps with them, when the block ends.
    """
    import gguf as gguf_typed
    from gguf.tensor_mapping import get_tensor_name_map

    gguf: Any = gguf_typed  # its attributes are replaced for the block's duration

    reader_class = plain_array_reader_class()
    cache: dict[tuple[str, str], Any] = {}

    def shared_reader(path: os.PathLike[str] | str, mode: str = "r") -> Any:
        key = (os.path.realpath(path), mode)
        if key not in cache:
            cache[key] = reader_class(path, mode)
        return cache[key]

    with _PATCH_LOCK:
        saved_reader, saved_name_map = gguf.GGUFReader, gguf.get_tensor_name_map
        gguf.GGUFReader = shared_reader
        gguf.get_tensor_name_map = functools.cache(get_tensor_name_map)
        try:
            yield cache
        finally:
            gguf.GGUFReader, gguf.get_tensor_name_map = saved_reader, saved_name_map
            cache.clear()
