"""Tests of the MemAgent-format readers and writers (training and evaluation rows)."""

import json

import pytest

from memagent_jax.data import formats as F
from memagent_jax.data.records import DataFormatError, QARecord


def train_row(i=0, **over):
    row = {
        "data_source": "hotpotqa",
        "prompt": [{"role": "user", "content": f"Who wrote book {i}?"}],
        "context": f"Document 1:\nBook {i}\nIt was written by Author {i}. Ünïcödé ✓",
        "reward_model": {"style": "rule", "ground_truth": [f"Author {i}", f"A. {i}"]},
        "extra_info": {"index": 100 + i, "split": "train"},
    }
    row.update(over)
    return row


def eval_row(i=0, **over):
    row = {
        "context": f"Document 1:\nPlace {i}\nIt lies north.",
        "input": f"Where is place {i}?",
        "answers": [f"north {i}"],
        "num_docs": 50,
        "index": i,
    }
    row.update(over)
    return row


SUFFIXES = [".jsonl", ".json", ".parquet"]


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_train_round_trip(tmp_path, suffix):
    rows = [train_row(i) for i in range(5)]
    path = tmp_path / f"train{suffix}"
    assert F.write_train_file(rows, path) == 5
    f = F.open_file(path)
    assert f.kind == "train" and len(f) == 5
    for i in range(5):
        assert f.row(i) == rows[i]  # the file loads unchanged
        rec = f[i]
        assert rec == QARecord(
            question=f"Who wrote book {i}?",
            document=rows[i]["context"],
            answers=(f"Author {i}", f"A. {i}"),
            index=100 + i,
            data_source="hotpotqa",
            extra={"index": 100 + i, "split": "train", "reward_style": "rule"},
        )
    # records -> file -> records is the identity
    path2 = tmp_path / f"again{suffix}"
    F.write_train_file(F.read_records(path), path2)
    assert F.read_records(path2) == F.read_records(path)
    assert f.validate() == 5


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_eval_round_trip(tmp_path, suffix):
    rows = [eval_row(i) for i in range(4)]
    path = tmp_path / f"eval_50{suffix}"
    F.write_eval_file(rows, path)
    f = F.open_file(path)
    assert f.kind == "eval" and len(f) == 4
    assert [f.row(i) for i in range(4)] == rows
    rec = f[2]
    assert rec == QARecord("Where is place 2?", rows[2]["context"], ("north 2",), 2, "eval_50", {"num_docs": 50})
    path2 = tmp_path / f"again{suffix}"
    F.write_eval_file(F.read_records(path), path2)
    assert [F.open_file(path2).row(i) for i in range(4)] == rows


def test_eval_optional_fields_and_single_string_answers(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_text(
        json.dumps({"context": "c", "input": "q", "answers": "only"})
        + "\n"
        + json.dumps({"context": "d", "input": "r", "answers": ["x"], "_id": "abc"})
        + "\n"
    )
    recs = F.read_records(path)
    assert recs[0].answers == ("only",) and recs[0].index == 0 and recs[0].extra == {}
    assert recs[1].index == 1 and recs[1].extra == {"_id": "abc"}


def test_json_array_and_lines_both_accepted_for_dot_json(tmp_path):
    rows = [eval_row(i) for i in range(3)]
    a = tmp_path / "array.json"
    a.write_text(json.dumps(rows))
    b = tmp_path / "lines.json"
    b.write_text("\n".join(json.dumps(r) for r in rows))
    assert F.read_records(a) == F.read_records(b, data_source="array")


def test_training_question_is_last_user_message(tmp_path):
    row = train_row(
        prompt=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "A"},
            {"role": "user", "content": "Q2"},
        ]
    )
    assert F.record_from_train_row(row).question == "Q2"


def test_extra_info_heterogeneous_keys_load_unchanged_from_jsonl(tmp_path):
    rows = [train_row(0, extra_info={"index": 0, "a": 1}), train_row(1, extra_info={"index": 1, "b": "s"})]
    path = tmp_path / "t.jsonl"
    F.write_train_file(rows, path)
    f = F.open_file(path)
    assert f.row(0)["extra_info"] == {"index": 0, "a": 1}
    assert f.row(1)["extra_info"] == {"index": 1, "b": "s"}


# ---------------------------------------------------------------------------------------------
# malformed rows: every kind names file, row and field
# ---------------------------------------------------------------------------------------------

BAD_TRAIN = [
    ("data_source", dict(data_source=None), "is null"),
    ("data_source", dict(data_source=3), "must be a string, got int"),
    ("prompt", dict(prompt="just text"), "must be a non-empty list of chat messages, got str"),
    ("prompt", dict(prompt=[]), "got an empty list"),
    ("prompt[0]", dict(prompt=["hello"]), "must be an object"),
    ("prompt[0].content", dict(prompt=[{"role": "user", "content": 5}]), "must be a string, got int"),
    ("prompt[0].role", dict(prompt=[{"content": "q"}]), "must be a string, got null"),
    ("prompt", dict(prompt=[{"role": "system", "content": "q"}]), "no message with role 'user'"),
    ("context", dict(context=["a", "b"]), "must be a string, got list"),
    ("reward_model", dict(reward_model="Paris"), "must be an object"),
    ("reward_model.ground_truth", dict(reward_model={"style": "rule"}), "is missing"),
    (
        "reward_model.ground_truth",
        dict(reward_model={"ground_truth": 7}),
        "must be a non-empty list of strings, got int",
    ),
    ("reward_model.ground_truth", dict(reward_model={"ground_truth": []}), "got an empty list"),
    ("reward_model.ground_truth[1]", dict(reward_model={"ground_truth": ["a", 2]}), "must be a string, got int"),
    ("reward_model.style", dict(reward_model={"ground_truth": ["a"], "style": 1}), "must be a string"),
    ("extra_info", dict(extra_info="x"), "must be an object"),
    ("extra_info.index", dict(extra_info={"index": "7"}), "must be an integer, got str"),
]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("field,override,problem", BAD_TRAIN)
def test_bad_training_row_named_error(tmp_path, field, override, problem):
    rows = [train_row(i) for i in range(4)]
    rows[2] = train_row(2, **override)
    path = tmp_path / "train.jsonl"
    _write_jsonl(path, rows)
    f = F.open_file(path, "train")
    f[0], f[1]  # good rows read fine
    with pytest.raises(DataFormatError) as err:
        f.validate()
    e = err.value
    assert (e.path, e.row, e.field) == (str(path), 2, field)
    assert problem in str(e)
    assert str(e).startswith(f"{path} row 2: field '{field}'")


def test_missing_training_field(tmp_path):
    rows = [train_row(0), {k: v for k, v in train_row(1).items() if k != "context"}]
    path = tmp_path / "train.jsonl"
    _write_jsonl(path, rows)
    with pytest.raises(DataFormatError, match=r"row 1: field 'context' is (missing|null)") as err:
        F.read_records(path)
    assert err.value.row == 1


BAD_EVAL = [
    ("context", dict(context=None), "is null"),
    ("input", dict(input=3.5), "must be a string, got float"),
    ("answers", dict(answers=[]), "got an empty list"),
    ("answers", dict(answers={"a": 1}), "must be a non-empty list of strings, got dict"),
    ("answers[0]", dict(answers=[None]), "must be a string, got null"),
    ("num_docs", dict(num_docs=-3), "must be a non-negative integer"),
    ("num_docs", dict(num_docs="50"), "must be a non-negative integer"),
    ("index", dict(index="x"), "must be an integer, got str"),
]


@pytest.mark.parametrize("field,override,problem", BAD_EVAL)
def test_bad_eval_row_named_error(tmp_path, field, override, problem):
    rows = [eval_row(i) for i in range(3)]
    rows[1] = eval_row(1, **override)
    path = tmp_path / "eval.jsonl"
    _write_jsonl(path, rows)
    with pytest.raises(DataFormatError) as err:
        F.read_records(path)
    e = err.value
    assert (e.path, e.row, e.field) == (str(path), 1, field)
    assert problem in str(e)


def test_bad_row_in_parquet_named(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [eval_row(i) for i in range(3)]
    rows[2]["context"] = None
    path = tmp_path / "eval.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(DataFormatError, match=r"eval.parquet row 2: field 'context' is null"):
        F.read_records(path)


def test_parquet_column_of_wrong_type_named(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [eval_row(i, answers=i) for i in range(2)]  # an int column instead of list<string>
    path = tmp_path / "eval.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(DataFormatError, match=r"row 0: field 'answers' must be a non-empty list of strings, got int"):
        F.read_records(path)


def test_invalid_json_line_named(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text(json.dumps(eval_row(0)) + "\n" + json.dumps(eval_row(1)) + "\n{not json\n")
    with pytest.raises(DataFormatError, match=r"eval.jsonl row 2: is not valid JSON") as err:
        F.open_file(path)
    assert err.value.row == 2


def test_non_object_json_line_named(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text(json.dumps(eval_row(0)) + "\n[1, 2]\n")
    with pytest.raises(DataFormatError, match=r"row 1: must be (a JSON object|an object)"):
        F.read_records(path)


def test_broken_json_array_named(tmp_path):
    path = tmp_path / "eval.json"
    path.write_text('[{"context": "c", "input": "q", "answers": ["a"]},\n {"context": ')
    with pytest.raises(DataFormatError, match=r"eval.json: is not valid JSON \(line 2"):
        F.open_file(path)


def test_unknown_kind_and_extension(tmp_path):
    path = tmp_path / "x.jsonl"
    _write_jsonl(path, [{"foo": 1}])
    with pytest.raises(DataFormatError, match="neither a training file"):
        F.open_file(path)
    with pytest.raises(DataFormatError, match="unknown extension"):
        F.open_file(tmp_path / "x.csv")
    ev = tmp_path / "e.jsonl"
    _write_jsonl(ev, [eval_row()])
    with pytest.raises(DataFormatError, match="opened as 'train'"):
        F.open_file(ev, "train")


def test_writer_checks_rows_before_writing(tmp_path):
    path = tmp_path / "out.parquet"
    with pytest.raises(DataFormatError, match=r"row 1: field 'answers'"):
        F.write_eval_file([eval_row(0), eval_row(1, answers=[])], path)
    assert not path.exists() and not list(tmp_path.iterdir())  # nothing half-written


def test_parquet_writer_needs_uniform_extra_info(tmp_path):
    rows = [train_row(i, extra_info={"index": i}) for i in range(3)] + [train_row(3, extra_info={"index": 3, "new": 1})]
    with pytest.raises(DataFormatError, match=r"row 3: field 'extra_info' adds keys \['new'\]"):
        F.write_train_file(rows, tmp_path / "t.parquet", rows_per_group=2)


def test_parquet_row_groups_stream(tmp_path):
    import pyarrow.parquet as pq

    rows = [eval_row(i) for i in range(10)]
    path = tmp_path / "e.parquet"
    F.write_eval_file(iter(rows), path, rows_per_group=3)
    assert pq.ParquetFile(path).num_row_groups == 4
    assert [F.open_file(path).row(i) for i in range(10)] == rows


def test_records_convert_both_ways():
    rec = QARecord("q?", "doc", ("a", "b"), 7, "src", {"num_docs": 3, "k": "v"})
    tr = F.train_row_from_record(rec)
    assert tr == {
        "data_source": "src",
        "prompt": [{"role": "user", "content": "q?"}],
        "context": "doc",
        "reward_model": {"style": "rule", "ground_truth": ["a", "b"]},
        "extra_info": {"num_docs": 3, "k": "v", "index": 7},
    }
    assert F.record_from_train_row(tr) == QARecord(
        "q?", "doc", ("a", "b"), 7, "src", {"num_docs": 3, "k": "v", "index": 7, "reward_style": "rule"}
    )
    ev = F.eval_row_from_record(rec)
    assert ev == {"context": "doc", "input": "q?", "answers": ["a", "b"], "num_docs": 3, "index": 7, "k": "v"}
    assert F.record_from_eval_row(ev, data_source="src") == rec


def test_data_package_imports_no_jax():
    import subprocess
    import sys

    code = (
        "import sys, memagent_jax.data, memagent_jax.data.hotpotqa, memagent_jax.data.iterator; "
        "assert not any(m == 'jax' or m.startswith('jax.') for m in sys.modules), 'jax imported'; "
        "assert 'tensorflow_datasets' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_mixed_type_json_column_read_exactly(tmp_path):
    """datasets turns a mixed-type JSON column into a Json column that decodes the string "1990"
    as a number; the reader must still see the exact values."""
    path = tmp_path / "e.jsonl"
    rows = [
        {"context": "c", "input": "q", "answers": "1990"},
        {"context": "d", "input": "r", "answers": ["x"], "num_docs": "50"},
    ]
    _write_jsonl(path, rows)
    f = F.open_file(path)
    assert f[0].answers == ("1990",)
    with pytest.raises(DataFormatError, match=r"row 1: field 'num_docs' must be a non-negative integer, got '50'"):
        f[1]
