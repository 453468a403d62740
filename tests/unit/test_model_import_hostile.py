"""`lie-detector model import` under hostile input (issue 23, findings 5 and 6).

Finding 5: the import removes only what an earlier import wrote (its marker lists the files
with their hashes); an ``--out`` that is a file, or a folder holding a user's file or folder,
or a file changed since, is refused and left as it was. Finding 6: truncated and mutated
GGUFs, a config.json that is not JSON or lies about sizes, and an ``--out`` under a file end
in one line on stderr and exit 2, before memory is allocated for what the file declares and
with nothing outside ``--out`` touched (the user's whole folder is hashed before and after).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from detector.models import importer as model_import
from detector.cli import main
from detector.models.importer import MARKER_FILE, ModelImportError, import_model
from tiny_models import write_gguf, write_hf_folder

REPO = Path(__file__).resolve().parents[2]
MUTATIONS = settings(max_examples=40, derandomize=True, deadline=None, database=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture,
                                            HealthCheck.too_slow])


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", add_bos=True)


@pytest.fixture(scope="module")
def hf_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_hf_folder(tmp_path_factory.mktemp("src") / "tiny-llama")


def tree(root: Path, skip: Path | None = None) -> dict[str, str]:
    """Every entry under ``root`` but ``skip``: its kind and its content's (or target's) hash."""
    entries = {}
    for path in sorted(root.rglob("*")):
        if skip is not None and (path == skip or skip in path.parents):
            continue
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            entries[rel] = "link:" + os.readlink(path)
        elif path.is_dir():
            entries[rel] = "dir"
        else:
            entries[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return entries


def cli(source: Path, out: Path, *extra: str) -> tuple[int, list[str]]:
    """The real command in its own process: exit status and stderr lines."""
    proc = subprocess.run(
        [sys.executable, "-m", "detector.cli", "model", "import", str(source), "--out", str(out),
         "--no-progress", *extra],
        capture_output=True, text=True, timeout=600, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    return proc.returncode, proc.stderr.strip().splitlines()


def assert_one_line_refusal(rc: int, stderr: list[str], *needles: str) -> None:
    assert rc == 2, (rc, stderr)
    assert len(stderr) == 1 and " ERROR " in stderr[0], stderr
    assert all(n in stderr[0] for n in needles), stderr[0]


def _set(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as fh:
        fh.seek(offset)
        fh.write(data)


def _gguf_value_offset(path: Path, key: str) -> int:
    """Where the value of metadata ``key`` starts (after its key and type)."""
    import gguf

    field = gguf.GGUFReader(path).fields[key]
    return field.offset + sum(int(p.nbytes) for p in field.parts[:3])


@functools.lru_cache(maxsize=2)
def _structural_fields(path: Path) -> list[tuple[int, int]]:
    """(offset, width) of the GGUF's lengths, counts and types: what a reader trusts."""
    import gguf

    reader = gguf.GGUFReader(path)
    found = [(8, 8), (16, 8)]  # tensor and metadata counts
    for field in list(reader.fields.values())[3:]:
        starts, at = [], field.offset
        for part in field.parts:
            starts.append(at)
            at += int(part.nbytes)
        picks = [0, 2]  # key length, value type
        if field.types[0] == gguf.GGUFValueType.STRING:
            picks.append(3)
        elif field.types[0] == gguf.GGUFValueType.ARRAY:
            picks += [3, 4] + ([5, 7] if field.types[-1] == gguf.GGUFValueType.STRING else [])
        found += [(starts[i], int(field.parts[i].nbytes)) for i in picks if i < len(starts)]
    for tensor in reader.tensors:
        found += [(tensor.field.offset, 8),  # name length
                  (tensor.field.offset + 8 + int(tensor.field.parts[1].nbytes), 4)]  # rank
    return found


# --- finding 5: never lose a user's file -----------------------------------------------------


@pytest.mark.parametrize("how", ["file", "symlink-to-file"])
def test_out_that_is_a_file_is_refused_and_kept(hf_source: Path, tmp_path: Path, how: str) -> None:
    user = tmp_path / "user"
    user.mkdir()
    (user / "existing_file.txt").write_text("mine\n")
    out = user / "existing_file.txt"
    if how == "symlink-to-file":
        out = user / "link"
        out.symlink_to(user / "existing_file.txt")
    before = tree(user)
    rc, stderr = cli(hf_source, out, "--no-verify")
    assert_one_line_refusal(rc, stderr, "is not a folder")
    assert tree(user) == before


def test_reimport_keeps_a_users_files_and_refuses(tmp_path: Path) -> None:
    from tiny_models import tiny_llama

    source = write_hf_folder(tmp_path / "src", seed=1)
    user = tmp_path / "user"
    out = user / "served"
    import_model(source, out, progress=False, verify=False)
    tiny_llama(seed=2).save_pretrained(source, safe_serialization=True)  # the source changed

    for name, make in [("notes.txt", lambda p: p.write_text("mine")),
                       ("my-probe", lambda p: (p.mkdir(), (p / "probe.json").write_text("{}"))),
                       ("config.json", lambda p: p.write_text(p.read_text() + " "))]:
        target = out / name
        saved = target.read_bytes() if target.is_file() else None
        make(target)
        before = tree(user)
        with pytest.raises(ModelImportError, match="did not write or that changed since") as err:
            import_model(source, out, progress=False, verify=False)
        assert name in str(err.value) and "\n" not in str(err.value)
        assert tree(user) == before, name
        if saved is None:
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        else:
            target.write_bytes(saved)
    marker = json.loads((out / MARKER_FILE).read_text())
    assert set(marker["files"]) == {p.name for p in out.iterdir()} - {MARKER_FILE}
    # Only what the import wrote: the new import replaces it, and leaves nothing beside it.
    before = tree(user, skip=out)
    report = import_model(source, out, progress=False, verify=False)
    assert not report.already_imported
    assert (out / "model.safetensors").read_bytes() == (source / "model.safetensors").read_bytes()
    assert tree(user, skip=out) == before
    # A marker that names a file outside its folder never gets that file removed.
    precious = user / "precious.txt"
    precious.write_text("mine")
    marker = json.loads((out / MARKER_FILE).read_text())
    marker["files"]["../precious.txt"] = {"size": 4, "sha256": hashlib.sha256(b"mine").hexdigest()}
    (out / MARKER_FILE).write_text(json.dumps(marker))
    tiny_llama(seed=3).save_pretrained(source, safe_serialization=True)
    import_model(source, out, progress=False, verify=False)
    assert precious.read_text() == "mine"


def test_marker_without_a_file_list_is_not_trusted(hf_source: Path, tmp_path: Path) -> None:
    out = tmp_path / "served"
    out.mkdir()
    (out / MARKER_FILE).write_text(json.dumps({"marker_version": 1, "source": {}}))
    (out / "weights-i-trained.safetensors").write_bytes(b"precious")
    with pytest.raises(ModelImportError, match="did not record its files"):
        import_model(hf_source, out, progress=False, verify=False)
    assert (out / "weights-i-trained.safetensors").read_bytes() == b"precious"


# --- finding 6: one line, exit 2, nothing touched --------------------------------------------


def _assert_refused_or_imported(source: Path, work: Path, caplog: pytest.LogCaptureFixture,
                                capsys: pytest.CaptureFixture[str], out: Path | None = None) -> str:
    """Runs the command in this process; returns its error line ("" when it imported)."""
    out = out or work / "out"
    before = tree(work)
    caplog.clear()
    rc = main(["model", "import", str(source), "--out", str(out), "--no-progress", "--no-verify"])
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert "Traceback" not in capsys.readouterr().err
    if rc == 0:  # a mutation the file survives: then it imported whole
        assert (out / MARKER_FILE).is_file() and (out / "config.json").is_file()
    else:
        assert rc == 2 and len(errors) == 1 and errors[0].exc_info is None
        assert "\n" not in errors[0].getMessage() and not out.exists()
    assert tree(work, skip=out) == before
    return errors[0].getMessage() if rc else ""


def _hostile_gguf(gguf_file: Path, dest: Path, case: str) -> Path:
    path = dest / "model.gguf"
    shutil.copy2(gguf_file, path)
    size = path.stat().st_size
    if case.startswith("truncated"):
        keep = {"truncated-8": 8, "truncated-1k": 1024, "truncated-half": size // 2}[case]
        with path.open("r+b") as fh:
            fh.truncate(keep)
    elif case == "tensor-count":
        _set(path, 8, (2**62).to_bytes(8, "little"))
    elif case == "kv-count":
        _set(path, 16, (2**62).to_bytes(8, "little"))
    elif case == "key-length":
        _set(path, 24, (2**62).to_bytes(8, "little"))
    elif case == "string-length":  # general.architecture's value
        _set(path, _gguf_value_offset(gguf_file, "general.architecture"),
             (2**62).to_bytes(8, "little"))
    elif case == "scrambled-key":
        _set(path, 32, b"\xff\xfe")
    elif case.startswith("hidden-"):
        _set(path, _gguf_value_offset(gguf_file, "llama.embedding_length"),
             int(case.removeprefix("hidden-")).to_bytes(4, "little"))
    else:
        raise AssertionError(case)
    return path


@pytest.mark.parametrize("case", ["truncated-8", "truncated-1k", "truncated-half", "tensor-count",
                                  "kv-count", "key-length", "string-length", "scrambled-key",
                                  "hidden-1024", "hidden-1152"])
def test_hostile_gguf_is_one_line_exit_2(gguf_file: Path, tmp_path: Path, case: str) -> None:
    source = _hostile_gguf(gguf_file, tmp_path, case)
    before = tree(tmp_path)
    rc, stderr = cli(source, tmp_path / "out", "--no-verify")
    assert_one_line_refusal(rc, stderr, str(source))
    assert tree(tmp_path) == before


@pytest.mark.parametrize("case", ["not-json", "hidden-1024", "hidden-1152", "layers-2^31",
                                  "out-under-a-file"])
def test_hostile_config_is_one_line_exit_2(hf_source: Path, tmp_path: Path, case: str,
                                           caplog: pytest.LogCaptureFixture,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """One case in its own process (stderr as a user sees it); the rest in this one, where
    torch and transformers are imported once."""
    source = tmp_path / "src"
    shutil.copytree(hf_source, source)
    out = tmp_path / "out"
    config = json.loads((source / "config.json").read_text())
    if case == "not-json":
        (source / "config.json").write_text('{"hidden_size": 64,')
    elif case.startswith("hidden-"):
        config["hidden_size"] = int(case.removeprefix("hidden-"))
        (source / "config.json").write_text(json.dumps(config))
    elif case == "layers-2^31":
        config["num_hidden_layers"] = 2**31
        (source / "config.json").write_text(json.dumps(config))
    else:
        (tmp_path / "a-file").write_text("mine")
        out = tmp_path / "a-file" / "out"
    if case != "hidden-1024":
        error = _assert_refused_or_imported(source, tmp_path, caplog, capsys, out=out)
        assert error and "cannot import" not in error, error  # refused by a check, by name
        return
    before = tree(tmp_path)
    rc, stderr = cli(source, out, "--no-verify")  # no generation: the shapes are checked anyway
    assert_one_line_refusal(rc, stderr, "config.json does not match the weights")
    assert tree(tmp_path) == before


ACCEPTED = "the header check accepted it"


@MUTATIONS
@given(data=st.data())
def test_gguf_reader_under_truncation_and_mutation(gguf_file: Path, tmp_path: Path, data,
                                                   caplog: pytest.LogCaptureFixture,
                                                   capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Mutations of the header's lengths, counts, types and strings, and truncations. The few
    the header check accepts are not converted (15 s each, through transformers): gguf's own
    reader must then parse them, which is what the check stands guard for."""
    import gguf

    def accepted(*args: object, **kwargs: object) -> None:
        raise ModelImportError(ACCEPTED)

    monkeypatch.setattr(model_import, "_convert_and_verify", accepted)
    work = Path(tempfile.mkdtemp(dir=tmp_path))
    source = work / "model.gguf"
    shutil.copy2(gguf_file, source)
    size = source.stat().st_size
    kind = data.draw(st.sampled_from(["truncate", "field", "scramble"]))
    if kind == "truncate":
        with source.open("r+b") as fh:
            fh.truncate(data.draw(st.integers(0, size - 1)))
    else:
        offset, width = data.draw(st.sampled_from(_structural_fields(gguf_file)))
        if kind == "field":
            value = data.draw(st.sampled_from([0, 1, 7, 2**31, 2**32 - 1, 2**62, 2**64 - 1, size]))
            _set(source, offset, (value % 2 ** (8 * width)).to_bytes(width, "little"))
        else:  # the bytes after a length: a key, a string, a tensor name
            _set(source, offset + width, data.draw(st.sampled_from([b"\xff", b"\xc3\x28",
                                                                    b"\xed\xa0\x80"])))
    if _assert_refused_or_imported(source, work, caplog, capsys) == ACCEPTED:
        from detector.models.gguf_header import read_header

        assert len(gguf.GGUFReader(source).tensors) == len(read_header(source).tensors) > 0


@MUTATIONS
@given(data=st.data())
def test_config_reader_under_truncation_and_mutation(hf_source: Path, tmp_path: Path, data,
                                                     caplog: pytest.LogCaptureFixture,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    work = Path(tempfile.mkdtemp(dir=tmp_path))
    source = work / "src"
    shutil.copytree(hf_source, source)
    raw = bytearray((source / "config.json").read_bytes())
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    else:
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at] = data.draw(st.sampled_from(b'{}[]":,0123456789e-\xff '))
    (source / "config.json").write_bytes(bytes(raw))
    _assert_refused_or_imported(source, work, caplog, capsys)


def test_gguf_header_is_checked_before_gguf_reader(gguf_file: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A declared 2^62 items never reaches a reader that would loop over them."""
    import gguf

    def no_reader(*args: object, **kwargs: object) -> None:
        raise AssertionError("GGUFReader opened a file that failed the header check")

    monkeypatch.setattr(gguf, "GGUFReader", no_reader)
    source = tmp_path / "model.gguf"
    shutil.copy2(gguf_file, source)
    _set(source, 16, (2**62).to_bytes(8, "little"))  # the metadata count
    with pytest.raises(ModelImportError, match="more than the file could hold"):
        model_import.import_model(source, tmp_path / "out", progress=False, verify=False)
