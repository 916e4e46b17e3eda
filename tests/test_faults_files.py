"""Fault injection on the files users name: builder outputs that collide with the input or with each other, inputs
that are directories, pipes or unreadable, writes that fail (disk full), and safetensors files that are cut short or
whose header lies.

Each test is one row of the fault table of docs/guides/evaluation.md: it injects the fault and checks what the user
is told (one line naming the file and flag, or the file and tensor; exit 2) and that nothing good is lost (the input
file byte for byte, no half-written file left behind).
"""

import builtins
import errno
import io
import json
import os
import shutil
import struct
import threading

import pytest
from test_data_hotpotqa import make_raw
from test_data_squad import make_squad

from hf_tiny import SMALL_ANSWER_FLAGS, make_agent_model_dir
from memagent_jax import answer
from memagent_jax.agent import AgentInputError, read_document_file
from memagent_jax.data import hotpotqa as H
from memagent_jax.data import squad as S
from memagent_jax.data.formats import open_file, write_eval_file
from memagent_jax.data.records import DataFormatError, DataWriteError
from memagent_jax.models import CheckpointError, load_hf_params
from memagent_jax.models.safetensors_io import SafetensorsFile

pytestmark = pytest.mark.faults

SMALL = SMALL_ANSWER_FLAGS
GOOD = [{"context": "The key is in the box. " * 4, "input": "Where is the key?", "answers": ["box"]}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_agent_model_dir(tmp_path_factory.mktemp("faults_files") / "model", variant="qwen2", seed=1)


def _one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------------ 1. builder outputs vs inputs


BUILDERS = {
    "hotpotqa": (H.main, lambda: make_raw(8)),
    "squad": (S.main, make_squad),
}


def _raw(tmp_path, builder: str, name: str, *, bad_row: bool = False):
    """A raw dataset file; with `bad_row`, one question the builder must send to the errors file."""
    data = BUILDERS[builder][1]()
    if bad_row and builder == "hotpotqa":
        data[2].pop("answer")
    elif bad_row:
        data["data"][0]["paragraphs"][1]["qas"][0]["answers"] = [{"text": ""}]
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


# (input file name, flags with {in} / {tmp}, the flags the error must name)
INPUT_IS_AN_OUTPUT = {
    "train_partial": (
        "train.jsonl.partial",
        ["--train_out", "{tmp}/train.jsonl", "--train_docs", "5"],
        ["--input", "--train_out"],
    ),
    "eval_partial": (
        "suite/eval_5docs.json.partial",
        ["--out_dir", "{tmp}/suite", "--eval_docs", "5"],
        ["--input", "--out_dir"],
    ),
    "errors_partial": (
        "errs.jsonl.partial",
        ["--train_out", "{tmp}/t.jsonl", "--train_docs", "5", "--errors", "{tmp}/errs.jsonl"],
        ["--input", "--errors"],
    ),
    "default_errors_partial": (
        "t.jsonl.errors.jsonl.partial",
        ["--train_out", "{tmp}/t.jsonl", "--train_docs", "5"],
        ["--input", "--errors"],
    ),
    "partial_through_a_linked_folder": (
        "real/train.jsonl.partial",
        ["--train_out", "{tmp}/link/train.jsonl", "--train_docs", "5"],
        ["--input", "--train_out"],
    ),
    "symlink_output": (
        "raw.json",
        ["--train_out", "{tmp}/alias.jsonl", "--train_docs", "5"],
        ["--input", "--train_out"],
    ),
}


@pytest.mark.parametrize("builder", list(BUILDERS))
@pytest.mark.parametrize("case", list(INPUT_IS_AN_OUTPUT))
def test_builder_never_writes_or_deletes_its_input(case, builder, tmp_path, capsys):
    name, flags, named = INPUT_IS_AN_OUTPUT[case]
    raw = _raw(tmp_path, builder, name, bad_row=True)  # the errors file is written too
    if case == "partial_through_a_linked_folder":
        os.symlink(tmp_path / "real", tmp_path / "link")
    if case == "symlink_output":
        os.symlink(raw, tmp_path / "alias.jsonl")
    before = raw.read_bytes()
    argv = ["--input", str(raw), *(f.format(tmp=tmp_path) for f in flags)]
    assert BUILDERS[builder][0](argv) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert all(flag in line for flag in named), line
    assert raw.read_bytes() == before
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink()) == [raw.name]


# (flags, the two flags the error must name)
OUTPUTS_THAT_COLLIDE = {
    "train_out_is_errors": (["--train_out", "{tmp}/x.jsonl", "--errors", "{tmp}/x.jsonl"], ["--train_out", "--errors"]),
    "train_out_in_the_suite": (
        ["--out_dir", "{tmp}/o", "--eval_docs", "5", "--train_out", "{tmp}/o/eval_5docs.json"],
        ["--out_dir", "--train_out"],
    ),
    "errors_in_the_suite": (
        ["--out_dir", "{tmp}/o", "--eval_docs", "5", "--errors", "{tmp}/o/eval_5docs.json"],
        ["--out_dir", "--errors"],
    ),
    "errors_is_the_temporary_train_file": (
        ["--train_out", "{tmp}/x.jsonl", "--errors", "{tmp}/x.jsonl.partial"],
        ["--train_out", "--errors"],
    ),
}


@pytest.mark.parametrize("case", list(OUTPUTS_THAT_COLLIDE))
def test_builder_refuses_two_outputs_naming_one_file(case, tmp_path, capsys):
    flags, named = OUTPUTS_THAT_COLLIDE[case]
    raw = _raw(tmp_path, "hotpotqa", "raw.json", bad_row=True)  # the errors file is written too
    assert H.main(["--input", str(raw), "--train_docs", "5", *(f.format(tmp=tmp_path) for f in flags)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "name the same file" in line and all(flag in line for flag in named), line
    assert [p.name for p in tmp_path.rglob("*")] == ["raw.json"]  # nothing built


# ------------------------------------------------------------------------ 2. inputs: directories, pipes, no access


def test_a_directory_is_called_a_directory(model_dir, tmp_path, capsys):
    folder = tmp_path / "docs.json"
    folder.mkdir()
    with pytest.raises(AgentInputError, match=r"docs\.json' is a directory"):
        read_document_file(folder)
    with pytest.raises(DataFormatError, match=r"docs\.json: is a directory"):
        open_file(folder)
    base = ["--model", model_dir, *SMALL]
    assert answer.main([*base, "--question", "q?", "--document", str(folder)]) == 2
    assert "--document" in (line := _one_error_line(capsys.readouterr().err)) and "is a directory" in line
    assert answer.main([*base, "--input", str(folder), "--output", str(tmp_path / "a.jsonl")]) == 2
    assert "--input" in (line := _one_error_line(capsys.readouterr().err)) and "is a directory" in line
    for main in (H.main, S.main):
        assert main(["--input", str(folder), "--train_out", str(tmp_path / "t.jsonl")]) == 2
        assert "--input" in (line := _one_error_line(capsys.readouterr().err)) and "is a directory" in line


def test_train_data_file_that_is_a_directory(tmp_path):
    from hf_tiny import grpo_cpu_config
    from memagent_jax.rl.recipe import TrainConfigError, validate_config

    model = make_agent_model_dir(tmp_path / "model", seed=2)
    folder = tmp_path / "train.jsonl"
    folder.mkdir()
    with pytest.raises(TrainConfigError, match=r"config\.data\.train_file: .*train\.jsonl' is a directory"):
        validate_config(grpo_cpu_config(model, **{"data.train_file": str(folder)}), device_count=8)


def test_document_from_standard_input_or_a_pipe(model_dir, tmp_path, monkeypatch, capsys):
    text = "The key is in the box. " * 4
    base = ["--model", model_dir, "--question", "Where is the key?", *SMALL]
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(text.encode())))
    assert answer.main([*base, "--document", "-"]) == 0
    assert capsys.readouterr().out.strip()
    # A FIFO (what /dev/stdin or <(cmd) is when fed by a pipe) passes the flag check and is read like a file.
    fifo = tmp_path / "doc.fifo"
    os.mkfifo(fifo)
    answer.check_args(answer._parser().parse_args([*base, "--document", str(fifo)]))

    def feed():
        with open(fifo, "w") as f:
            f.write(text)

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    assert read_document_file(fifo) == text
    writer.join(5)


def _deny(monkeypatch, denied):
    """open() of `denied` raises PermissionError (tests run as root, where chmod 000 does not stop a read)."""
    real_open = builtins.open

    def fake_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and os.path.abspath(file) == os.path.abspath(denied):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)


def test_unreadable_inputs_are_one_line_errors(model_dir, tmp_path, monkeypatch, capsys):
    doc = tmp_path / "doc.txt"
    doc.write_text("The key is in the box.")
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in GOOD))
    raw = _raw(tmp_path, "hotpotqa", "raw.json")
    for path in (doc, rows, raw):
        _deny(monkeypatch, path)
        if path is doc:
            with pytest.raises(AgentInputError, match=r"doc\.txt' cannot be read \(permission denied\)"):
                read_document_file(doc)
            argv = ["--model", model_dir, *SMALL, "--question", "q?", "--document", str(doc)]
            assert answer.main(argv) == 2
        elif path is rows:
            with pytest.raises(DataFormatError, match=r"rows\.jsonl: cannot be read \(permission denied\)"):
                open_file(rows)
            with pytest.raises(DataFormatError, match=r"rows\.jsonl: cannot be read \(permission denied\)"):
                open_file(rows, on_bad_row="keep")  # evaluate's reader
            out = tmp_path / "answers.jsonl"
            assert answer.main(["--model", model_dir, *SMALL, "--input", str(rows), "--output", str(out)]) == 2
            assert not out.exists() and not os.path.exists(f"{out}.partial")
        else:
            assert H.main(["--input", str(raw), "--train_out", str(tmp_path / "t.jsonl")]) == 2
            assert not (tmp_path / "t.jsonl").exists()
        line = _one_error_line(capsys.readouterr().err)
        assert path.name in line and "permission denied" in line, line
        monkeypatch.undo()


# ------------------------------------------------------------------------ 2. writes that fail (disk full)


def _disk_full_on_replace(monkeypatch, target):
    real_replace = os.replace

    def fake_replace(src, dst, *args, **kwargs):
        if os.path.abspath(dst) == os.path.abspath(target):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", fake_replace)


def _disk_full_on_write(monkeypatch, target):
    """Files opened for writing at `target` accept a few bytes, then raise ENOSPC."""
    real_open = builtins.open

    class Full(io.TextIOWrapper):
        def write(self, s):
            raise OSError(errno.ENOSPC, "No space left on device")

    def fake_open(file, mode="r", *args, **kwargs):
        if "w" in mode and isinstance(file, (str, os.PathLike)) and os.path.abspath(file) == os.path.abspath(target):
            real_open(file, "wb").close()  # the file exists, as a real one would
            return Full(real_open(file, "ab"), encoding="utf-8")
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)


@pytest.mark.parametrize("builder", list(BUILDERS))
@pytest.mark.parametrize("where", ["train_replace", "train_write", "eval_write", "errors_write"])
def test_disk_full_is_one_line_naming_the_output(where, builder, tmp_path, monkeypatch, capsys):
    raw = _raw(tmp_path, builder, "raw.json", bad_row=where == "errors_write")
    before = raw.read_bytes()
    train, suite, errors = tmp_path / "train.jsonl", tmp_path / "suite", tmp_path / "errs.jsonl"
    argv = ["--input", str(raw), "--train_out", str(train), "--train_docs", "5", "--errors", str(errors)]
    if where == "train_replace":
        failing = train
        _disk_full_on_replace(monkeypatch, train)
    elif where == "train_write":
        failing = train
        _disk_full_on_write(monkeypatch, f"{train}.partial")
    elif where == "eval_write":
        failing = suite / "eval_5docs.json"
        argv = ["--input", str(raw), "--out_dir", str(suite), "--eval_docs", "5"]
        _disk_full_on_write(monkeypatch, f"{failing}.partial")
    else:  # the bad row: the training file is written, then the errors file fails
        failing = errors
        _disk_full_on_write(monkeypatch, f"{errors}.partial")
    assert BUILDERS[builder][0](argv) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and last.startswith("error: ") and str(failing) in last, err
    assert "No space left on device" in last
    assert raw.read_bytes() == before
    assert not [p for p in tmp_path.rglob("*.partial")], "a partial file was left behind"
    assert not failing.exists()


def test_writer_names_the_file_and_removes_the_partial_one(tmp_path, monkeypatch):
    out = tmp_path / "eval.jsonl"
    out.write_text("an older file\n")
    _disk_full_on_write(monkeypatch, f"{out}.partial")
    with pytest.raises(DataWriteError, match=r"eval\.jsonl: cannot be written \(No space left on device\)") as e:
        write_eval_file(GOOD, out)
    assert e.value.errno == errno.ENOSPC and isinstance(e.value, OSError)
    assert out.read_text() == "an older file\n" and not os.path.exists(f"{out}.partial")


# ------------------------------------------------------------------------ 3. truncated or lying safetensors


def _write_raw_safetensors(path, header: dict, data: bytes, header_len: int | None = None):
    blob = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob) if header_len is None else header_len))
        f.write(blob)
        f.write(data)


def _entry(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


# name -> (header, data bytes, header length override, what the message must say)
LYING_FILES = {
    "offsets_past_the_end": ({"a": _entry("F32", [2, 2], 0, 16), "b": _entry("F32", [4], 16, 32)}, 16, None, "'b'"),
    "overlapping_tensors": ({"a": _entry("F32", [4], 0, 16), "b": _entry("F32", [4], 8, 24)}, 24, None, "overlaps"),
    "dtype_does_not_match_bytes": ({"a": _entry("F16", [2, 2], 0, 16)}, 16, None, "needs 8"),
    "shape_does_not_match_bytes": ({"a": _entry("F32", [3], 0, 16)}, 16, None, "needs 12"),
    "offsets_backwards": ({"a": _entry("F32", [0], 16, 0)}, 16, None, "ends before it begins"),
    "shape_not_a_list": ({"a": {"dtype": "F32", "shape": "2x2", "data_offsets": [0, 16]}}, 16, None, "'shape'"),
    "offsets_not_a_pair": ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [16]}}, 16, None, "'data_offsets'"),
    "entry_not_an_object": ({"a": [1, 2]}, 16, None, "not a JSON object"),
    "header_length_larger_than_the_file": ({"a": _entry("F32", [4], 0, 16)}, 16, 10_000, "larger than the rest"),
    "no_header_at_all": (None, 0, None, "too short"),
}


@pytest.mark.parametrize("case", list(LYING_FILES))
def test_lying_safetensors_header_is_a_checkpoint_error(case, tmp_path):
    header, nbytes, header_len, says = LYING_FILES[case]
    path = tmp_path / "model.safetensors"
    if header is None:
        path.write_bytes(b"\x01\x02")
    else:
        _write_raw_safetensors(path, header, bytes(nbytes), header_len)
    with pytest.raises(CheckpointError) as e:
        f = SafetensorsFile(str(path))
        for name in f.names():
            f.read(name)
    message = str(e.value)
    assert str(path) in message and says in message, message
    if header is not None and header_len is None:
        assert "tensor '" in message, message


def _cut_model(model_dir, dst, cut_bytes=None) -> str:
    """A copy of the model folder whose weights file lost its last `cut_bytes` (default: its second half)."""
    shutil.copytree(model_dir, dst)
    weights = os.path.join(dst, "model.safetensors")
    size = os.path.getsize(weights)
    with open(weights, "r+b") as f:
        f.truncate(size - cut_bytes if cut_bytes else size // 2)
    return str(dst)


def test_cut_short_weights_name_the_file_and_tensor(model_dir, tmp_path):
    src = SafetensorsFile(os.path.join(model_dir, "model.safetensors"))
    last = max(src.names(), key=lambda n: src._entries[n]["data_offsets"][1])
    cut = _cut_model(model_dir, tmp_path / "cut", cut_bytes=4)  # only the last tensor loses bytes
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor '{last}': byte range .* runs past the end"):
        load_hf_params(cut)


@pytest.mark.parametrize("entry", ["answer", "serve", "evaluate"])
def test_cut_short_weights_exit_2_with_one_line(entry, model_dir, tmp_path, capsys):
    cut = _cut_model(model_dir, tmp_path / "cut")
    doc = tmp_path / "doc.txt"
    doc.write_text("The key is in the box.")
    if entry == "answer":
        assert answer.main(["--model", cut, *SMALL, "--question", "q?", "--document", str(doc)]) == 2
    elif entry == "serve":
        from memagent_jax.serve import server

        assert server.main(["--model", cut, "--log-level", "error"]) == 2
    else:
        from absl import flags

        from memagent_jax import evaluate as ev

        rows = tmp_path / "qa.jsonl"
        write_eval_file(GOOD, rows)
        argv = [
            "evaluate",
            "--config",
            os.path.join(os.path.dirname(__file__), "..", "configs", "evaluate.py") + ":cpu",
            "--workdir",
            str(tmp_path / "w"),
            f"--config.models=m={cut}",
            f"--config.eval_files={rows}",
            "--config.warmup=False",
            "--config.plot=False",
            "--config.progress=False",
        ]
        fv = flags.FlagValues()
        ev.define_flags(fv, sys_argv=argv)
        fv(argv)
        with pytest.raises(SystemExit) as exit_info:
            ev.main(["evaluate"])
        assert exit_info.value.code == 2
    err = capsys.readouterr().err
    line = [x for x in err.strip().splitlines() if x.startswith("error: ")]
    assert len(line) == 1 and "Traceback" not in err, err
    assert "model.safetensors" in line[0] and "tensor '" in line[0], line[0]
