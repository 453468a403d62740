"""The fast GGUF reading (detector/models/gguf_reading.py) reads exactly what gguf's own reader reads,
and loading a GGUF for import parses the file once.

The GGUF is a tiny Llama quantised to Q4_1, as the embedded model's file is (tests/tiny_models.py),
so the comparison goes through gguf's dequantisation too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from detector.models import importer as model_import
from detector.models.gguf_reading import gguf_read_once, plain_array_reader_class
from tiny_models import Shape, tiny_llama, write_gguf


@pytest.fixture(scope="module")
def q4_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import gguf

    folder = tmp_path_factory.mktemp("gguf-q4")
    return write_gguf(folder / "tiny-q4_1.gguf", add_bos=True, qtype=gguf.GGMLQuantizationType.Q4_1)


def test_plain_array_reader_reads_what_gguf_reads(q4_gguf: Path) -> None:
    import gguf
    from gguf.gguf_reader import GGUFReader

    reference, fast = GGUFReader(q4_gguf), plain_array_reader_class()(q4_gguf)
    assert type(reference.data) is np.memmap and type(fast.data) is np.ndarray
    assert not fast.data.flags.writeable

    assert list(fast.fields) == list(reference.fields)
    for name, want in reference.fields.items():
        got = fast.fields[name]
        assert (got.offset, got.data, got.types) == (want.offset, want.data, want.types), name
        assert [(p.dtype, p.tobytes()) for p in got.parts] == [(p.dtype, p.tobytes()) for p in want.parts], name

    assert any(t.tensor_type == gguf.GGMLQuantizationType.Q4_1 for t in reference.tensors)
    assert len(fast.tensors) == len(reference.tensors)
    for want, got in zip(reference.tensors, fast.tensors):
        assert (got.name, got.tensor_type, got.shape.tolist(), got.data_offset) == (
            want.name, want.tensor_type, want.shape.tolist(), want.data_offset)
        want_values = gguf.dequantize(want.data, want.tensor_type)
        got_values = gguf.dequantize(got.data, got.tensor_type)
        assert got_values.dtype == want_values.dtype and got_values.shape == want_values.shape
        assert got_values.tobytes() == want_values.tobytes(), want.name


def test_gguf_read_once_shares_one_reader_then_restores_gguf(q4_gguf: Path) -> None:
    import gguf

    before = (gguf.GGUFReader, gguf.get_tensor_name_map)
    with gguf_read_once() as cache:
        first = gguf.GGUFReader(q4_gguf)
        assert gguf.GGUFReader(str(q4_gguf)) is first and len(cache) == 1
        name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is name_map
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == before
    assert not cache


def test_load_gguf_parses_the_file_once(q4_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers opens the file for its config, tokenizer and weights, the BOS/EOS flags a
    fourth time: each opening walked the whole vocabulary (most of the embedded model's import)."""
    from gguf.gguf_reader import GGUFReader

    parses: list[str] = []
    original_init = GGUFReader.__init__

    def counting_init(self: GGUFReader, path: object, *args: object, **kwargs: object) -> None:
        parses.append(str(path))
        original_init(self, path, *args, **kwargs)

    monkeypatch.setattr(GGUFReader, "__init__", counting_init)
    model_import.load_gguf(q4_gguf)
    assert len(parses) == 1, parses


def test_load_gguf_gives_the_tensors_and_vocabulary_of_transformers_alone(q4_gguf: Path) -> None:
    """The reference path: transformers' GGUF loading with gguf's reader as shipped."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reference = AutoModelForCausalLM.from_pretrained(
        q4_gguf.parent, gguf_file=q4_gguf.name, **model_import._dtype_kwarg(torch.float32))
    reference_tokenizer = AutoTokenizer.from_pretrained(q4_gguf.parent, gguf_file=q4_gguf.name)
    model, tokenizer, _, _ = model_import.load_gguf(q4_gguf)

    want, got = reference.state_dict(), model.state_dict()
    assert list(got) == list(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        assert torch.equal(got[name].view(torch.int32), tensor.view(torch.int32)), name  # bit for bit
    assert tokenizer.get_vocab() == reference_tokenizer.get_vocab()
    assert model.config.to_dict() == reference.config.to_dict()


def test_small_model_generates_on_one_thread_and_the_setting_comes_back() -> None:
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen: list[int] = []
        model = tiny_llama(0, Shape())
        original_generate = model.generate

        def generate(*args: object, **kwargs: object) -> object:
            seen.append(torch.get_num_threads())
            return original_generate(*args, **kwargs)

        model.generate = generate  # type: ignore[method-assign]
        model_import._greedy(model.eval(), [1, 2, 3], 2)
        assert seen == [1]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(saved)
