"""The `answer` CLI: single document with a trace, batch mode with a bad row, clear errors."""

import json

import pytest

from hf_tiny import make_agent_model_dir
from memagent_jax import answer
from memagent_jax.data.formats import write_eval_file
from memagent_jax.data.records import QARecord

SMALL = [
    "--agent.question_tokens",
    "32",
    "--agent.chunk_tokens",
    "24",
    "--agent.memory_tokens",
    "16",
    "--agent.answer_tokens",
    "6",
    "--agent.chunks_per_segment",
    "2",
    "--no-progress",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_agent_model_dir(tmp_path_factory.mktemp("cli") / "model", variant="qwen2", seed=1)


def test_single_document_with_trace(model_dir, tmp_path, capsys):
    doc = tmp_path / "doc.txt"
    doc.write_text("The red key is under the third stone. " * 12, encoding="utf-8")
    code = answer.main(
        ["--model", model_dir, "--question", "Where is the key?", "--document", str(doc), "--trace"] + SMALL
    )
    out, err = capsys.readouterr()
    assert code == 0
    assert out.count("--- memory after chunk") >= 3
    assert "chunks in" in err


def test_batch_mode_skips_bad_rows_and_scores(model_dir, tmp_path):
    records = [
        QARecord(question="Where is the key?", document="The key is in the box. " * 5, answers=("box",), index=0),
        QARecord(question="What colour?", document="It was green. " * 9, answers=("green",), index=1),
    ]
    path = tmp_path / "eval.jsonl"
    write_eval_file(records, path)
    with open(path, "a", encoding="utf-8") as f:  # a row with an empty question
        f.write(json.dumps({"context": "text", "input": "", "answers": ["x"]}) + "\n")
    out_path = tmp_path / "out" / "answers.jsonl"
    assert answer.main(["--model", model_dir, "--input", str(path), "--output", str(out_path)] + SMALL) == 1
    rows = [json.loads(line) for line in out_path.read_text().splitlines()]
    errors = [r for r in rows if "error" in r]
    answered = sorted((r for r in rows if "error" not in r), key=lambda r: r["row"])
    assert len(errors) == 1 and errors[0]["row"] == 2 and "question" in errors[0]["error"]
    assert [r["index"] for r in answered] == [0, 1]
    for r in answered:
        assert 0.0 <= r["sub_em"] <= 1.0 and r["num_chunks"] >= 1 and isinstance(r["answer"], str)


def test_missing_document_is_a_clear_error(model_dir, tmp_path, capsys):
    code = answer.main(["--model", model_dir, "--question", "q?", "--document", str(tmp_path / "nope.txt")] + SMALL)
    assert code == 2
    assert "nope.txt' does not exist" in capsys.readouterr().err
