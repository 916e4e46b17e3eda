"""The builder command lines: `python -m memagent_jax.data.hotpotqa` and `python -m memagent_jax.data.squad`.

Contract: a bad input row becomes a line of the errors file (file, row, field) and the rest are built; exit 0 all
good, 1 some rows failed, 2 nothing built; outputs written atomically and never over the input.
"""

import json
import os
import subprocess
import sys

import pytest
from test_data_hotpotqa import make_raw
from test_data_squad import make_squad

from memagent_jax.data import hotpotqa as H
from memagent_jax.data import read_records
from memagent_jax.data import squad as S

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_module(module, *args):
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=120
    )


@pytest.mark.parametrize("module", ["memagent_jax.data.hotpotqa", "memagent_jax.data.squad"])
def test_help(module):
    out = _run_module(module, "--help")
    assert out.returncode == 0, out.stderr
    for flag in ("--input", "--out_dir", "--eval_docs", "--num_questions", "--train_out", "--seed", "--errors"):
        assert flag in out.stdout
    assert "RuntimeWarning" not in out.stderr


def test_hotpotqa_cli_as_a_module(tmp_path):
    raw = tmp_path / "hotpot_dev.json"
    raw.write_text(json.dumps(make_raw(8)))
    out = _run_module(
        "memagent_jax.data.hotpotqa",
        "--input",
        str(raw),
        "--out_dir",
        str(tmp_path / "suite"),
        "--eval_docs",
        "10,20",
        "--num_questions",
        "4",
        "--train_out",
        str(tmp_path / "train.parquet"),
        "--train_docs",
        "12",
        "--limit",
        "3",
    )
    assert out.returncode == 0, out.stderr
    assert "8 questions read, 0 rows failed" in out.stderr.strip().splitlines()[-1]
    for n in (10, 20):
        recs = read_records(tmp_path / "suite" / f"eval_{n}docs.json")
        assert len(recs) == 4 and all(r.extra["num_docs"] == n for r in recs)
    assert [r.index for r in read_records(tmp_path / "train.parquet")] == [0, 1, 2]
    assert not (tmp_path / "suite" / "errors.jsonl").exists()
    # Same input and seed: byte-identical files.
    again = H.main(
        ["--input", str(raw), "--out_dir", str(tmp_path / "again"), "--eval_docs", "10,20", "--num_questions", "4"]
    )
    assert again == 0
    assert (tmp_path / "again" / "eval_20docs.json").read_bytes() == (
        tmp_path / "suite" / "eval_20docs.json"
    ).read_bytes()


def test_hotpotqa_cli_bad_rows_reported_others_built(tmp_path, capsys):
    data = make_raw(8)
    data[2].pop("answer")
    data[5]["context"][1][1] = "not a list"
    raw = tmp_path / "raw.json"
    raw.write_text(json.dumps(data))
    status = H.main(
        [
            "--input",
            str(raw),
            "--out_dir",
            str(tmp_path / "suite"),
            "--eval_docs",
            "10",
            "--num_questions",
            "8",
            "--train_out",
            str(tmp_path / "train.jsonl"),
            "--train_docs",
            "10",
        ]
    )
    assert status == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "6 questions read, 2 rows failed" in err[-1] and "errors.jsonl" in err[-1]
    entries = [json.loads(line) for line in (tmp_path / "suite" / "errors.jsonl").read_text().splitlines()]
    assert [(e["file"], e["row"], e["field"]) for e in entries] == [
        (str(raw), 2, "answer"),
        (str(raw), 5, "context[1]"),
    ]
    assert all(str(raw) in e["error"] for e in entries)
    assert len(read_records(tmp_path / "suite" / "eval_10docs.json")) == 6
    assert len(read_records(tmp_path / "train.jsonl")) == 6


def test_hotpotqa_cli_question_that_cannot_be_built(tmp_path, capsys):
    """More gold paragraphs than documents: that (question, N) is an error entry; the other N still built."""
    raw = tmp_path / "raw.json"
    raw.write_text(json.dumps(make_raw(4)))
    status = H.main(
        ["--input", str(raw), "--out_dir", str(tmp_path / "s"), "--eval_docs", "1,6", "--num_questions", "4"]
    )
    assert status == 1
    entries = [json.loads(x) for x in (tmp_path / "s" / "errors.jsonl").read_text().splitlines()]
    assert len(entries) == 4 and {e["num_docs"] for e in entries} == {1}
    assert all("cannot be built with 1 documents" in e["error"] for e in entries)
    assert len(read_records(tmp_path / "s" / "eval_6docs.json")) == 4
    assert not (tmp_path / "s" / "eval_1docs.json").exists()  # no question could be built: no empty file


def test_cli_never_writes_over_its_input_and_checks_flags(tmp_path, capsys):
    raw = tmp_path / "eval_10docs.json"
    raw.write_text(json.dumps(make_raw(4)))
    before = raw.read_bytes()
    assert H.main(["--input", str(raw), "--out_dir", str(tmp_path), "--eval_docs", "10"]) == 2
    assert "is the input file" in capsys.readouterr().err
    assert raw.read_bytes() == before
    assert H.main(["--input", str(raw), "--train_out", str(raw)]) == 2
    assert raw.read_bytes() == before
    assert H.main(["--input", str(tmp_path / "missing.json"), "--out_dir", str(tmp_path / "o")]) == 2
    assert H.main(["--input", str(raw), "--out_dir", str(tmp_path / "o"), "--eval_docs", "10,x"]) == 2
    assert "--eval_docs" in capsys.readouterr().err
    assert H.main(["--input", str(raw)]) == 2  # nothing to build
    assert H.main(["--input", str(raw), "--out_dir", str(tmp_path / "o"), "--num_questions", "0"]) == 2
    bad = tmp_path / "bad.json"
    bad.write_text("{broken")
    assert H.main(["--input", str(bad), "--out_dir", str(tmp_path / "o")]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_squad_cli_as_a_module(tmp_path):
    src = tmp_path / "dev-v2.0.json"
    src.write_text(json.dumps(make_squad()))
    out = _run_module(
        "memagent_jax.data.squad",
        "--input",
        str(src),
        "--out_dir",
        str(tmp_path / "qa1"),
        "--eval_docs",
        "3,6",
        "--num_questions",
        "5",
        "--suffix",
        ".jsonl",
    )
    assert out.returncode == 0, out.stderr
    assert "12 questions read, 0 rows failed" in out.stderr.strip().splitlines()[-1]
    for n in (3, 6):
        recs = read_records(tmp_path / "qa1" / f"eval_{n}docs.jsonl")
        assert len(recs) == 5 and recs[0].answers == ("kw00", "kw00.") and recs[0].extra["num_docs"] == n


def test_squad_cli_bad_rows(tmp_path, capsys):
    data = make_squad()
    data["data"][0]["paragraphs"][1]["qas"][0]["answers"] = [{"text": ""}]
    src = tmp_path / "squad.json"
    src.write_text(json.dumps(data))
    status = S.main(["--input", str(src), "--train_out", str(tmp_path / "train.parquet"), "--train_docs", "4"])
    assert status == 1
    assert "11 questions read, 1 rows failed" in capsys.readouterr().err.strip().splitlines()[-1]
    entries = [json.loads(x) for x in (tmp_path / "train.parquet.errors.jsonl").read_text().splitlines()]
    assert [(e["file"], e["row"], e["field"]) for e in entries] == [
        (str(src), 2, "data[0].paragraphs[1].qas[0].answers[0].text")
    ]
    recs = read_records(tmp_path / "train.parquet")
    assert len(recs) == 11 and recs[0].data_source == "squad"
    # A file with no answerable question builds nothing: exit 2.
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"data": []}))
    assert S.main(["--input", str(empty), "--out_dir", str(tmp_path / "none")]) == 2
