"""The `answer` CLI: single document with a trace, batch mode with a bad row, clear errors."""

import json

import pytest

from hf_tiny import SMALL_ANSWER_FLAGS, make_agent_model_dir
from memagent_jax import answer
from memagent_jax.data.formats import write_eval_file
from memagent_jax.data.records import QARecord

SMALL = SMALL_ANSWER_FLAGS


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
        assert 0.0 <= r["sub_em"] <= 1.0 and r["num_chunks"] >= 1 and isinstance(r["response"], str)


def test_missing_document_is_a_clear_error(model_dir, tmp_path, capsys):
    code = answer.main(["--model", model_dir, "--question", "q?", "--document", str(tmp_path / "nope.txt")] + SMALL)
    assert code == 2
    assert "nope.txt' does not exist" in capsys.readouterr().err


def _boxed_responses(monkeypatch, template: str = "The word is \\boxed{{{}}}.") -> None:
    """Every final response becomes `template` around the model's own text stripped of braces (the decoding patched)."""
    from memagent_jax.agent import MemoryAgent

    texts = MemoryAgent._answer_texts
    monkeypatch.setattr(
        MemoryAgent, "_answer_texts", lambda self, ids: [template.format(t.count(" ")) for t in texts(self, ids)]
    )


def _single(model_dir, tmp_path, capsys, *extra) -> tuple[str, str]:
    """(the answer line's text, the response) printed by the single-document mode; stdout holds nothing else."""
    doc = tmp_path / "doc.txt"
    doc.write_text("The red key is under the third stone. " * 6, encoding="utf-8")
    code = answer.main(
        ["--model", model_dir, "--question", "Where is the key?", "--document", str(doc)] + SMALL + list(extra)
    )
    out = capsys.readouterr().out
    assert code == 0 and out.startswith("answer: ") and out.endswith("\n")
    head, sep, response = out[:-1].partition("\nresponse: ")
    assert sep, out
    return head[len("answer: ") :], response


def test_single_document_prints_the_answer_and_the_response(model_dir, tmp_path, capsys, monkeypatch):
    from memagent_jax.evaluation.verifier import readable_answer

    # The tiny model's own text: the answer line is the default rule ('boxed') on the response.
    shown, response = _single(model_dir, tmp_path, capsys)
    assert shown == (readable_answer(response) or "(none)")
    # --agent.extract raw: the whole response is the answer.
    shown, raw = _single(model_dir, tmp_path, capsys, "--agent.extract", "raw")
    assert raw == response and shown == readable_answer(response, "raw")
    # A boxed response: the answer is its box, the response is printed whole.
    _boxed_responses(monkeypatch)
    shown, response = _single(model_dir, tmp_path, capsys)
    words = response[len("The word is \\boxed{") : -len("}.")]
    assert response == f"The word is \\boxed{{{words}}}." and shown == words


def test_batch_rows_carry_the_answer_and_the_response(model_dir, tmp_path, monkeypatch):
    from memagent_jax.evaluation import verifier

    _boxed_responses(monkeypatch, "It is \\boxed{{box}} ({} spaces)")
    records = [
        QARecord(question="Where is the key?", document="The key is in the box. " * 5, answers=("box",), index=0),
        QARecord(question="What colour?", document="It was green. " * 9, answers=("green",), index=1),
    ]
    path = tmp_path / "eval.jsonl"
    write_eval_file(records, path)
    out_path = tmp_path / "answers.jsonl"
    assert answer.main(["--model", model_dir, "--input", str(path), "--output", str(out_path)] + SMALL) == 0
    rows = sorted((json.loads(line) for line in out_path.read_text().splitlines()), key=lambda r: r["row"])
    assert [r["answer"] for r in rows] == ["box", "box"]
    for r in rows:
        assert r["response"].startswith("It is \\boxed{box} (") and r["response"].endswith(" spaces)")
        for metric in ("sub_em", "em"):  # scored from the response, as before
            assert r[metric] == verifier.score(r["response"], r["answers"], metric)
    assert [(r["sub_em"], r["em"]) for r in rows] == [(1.0, 1.0), (0.0, 0.0)]


def test_the_settings_file_extraction_rule_is_used(model_dir, tmp_path, capsys):
    """The model folder's memagent_agent.json "extract" reaches the agent (CLI and from_pretrained); flags win."""
    import shutil

    from memagent_jax.agent import AgentBudgets, AgentTemplates, MemoryAgent, write_agent_settings

    folder = str(tmp_path / "model")
    shutil.copytree(model_dir, folder)
    write_agent_settings(
        folder,
        budgets=AgentBudgets(
            question_tokens=32, chunk_tokens=24, memory_tokens=16, answer_tokens=6, chunks_per_segment=2
        ),
        templates=AgentTemplates(),
        temperature=None,
        top_p=None,
        extract="raw",
    )
    assert MemoryAgent.from_pretrained(folder).extract == "raw"
    assert MemoryAgent.from_pretrained(folder, extract="boxed_or_raw").extract == "boxed_or_raw"
    shown, response = _single(folder, tmp_path, capsys)
    assert shown == response
    shown, response = _single(folder, tmp_path, capsys, "--agent.extract", "boxed")
    assert shown != response


def _rows_file(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


@pytest.mark.faults
def test_rows_with_their_own_sampling(model_dir, tmp_path):
    """Rows carrying "sampling" run with their own settings and seed in the same batches as the others; rows without
    it answer as they would in a file without any; a bad value is a row error naming the field."""
    import jax

    from memagent_jax.evaluation.answering import answer_file
    from memagent_jax.model_flags import build_agent

    args = answer._parser().parse_args(
        ["--model", model_dir, "--input", "x", "--output", "y", "--agent.temperature", "1"] + SMALL
    )
    agent = build_agent(args)
    docs = ["The key is in the box. " * 5, "It was green. " * 9, "The door is blue. " * 4, "Ra sails at dawn. " * 7]
    questions = ["Where is the key?", "What colour?", "Which door?", "Who sails?"]
    own = [
        None,
        {"temperature": 0},
        {"temperature": -1, "top_k": 3},
        None,
        {"temperature": 1.0, "top_k": 5, "top_p": 0.9, "seed": 11},
    ]
    rows = [
        dict({"context": docs[i % 4], "input": questions[i % 4], "answers": ["x"]}, **({"sampling": s} if s else {}))
        for i, s in enumerate(own)
    ]
    mixed, plain = tmp_path / "mixed.jsonl", tmp_path / "plain.jsonl"
    assert answer_file(agent, _rows_file(tmp_path / "mixed_in.jsonl", rows), str(mixed), batch_size=2, seed=4) == 1
    without = [{k: v for k, v in r.items() if k != "sampling"} for r in rows]
    assert answer_file(agent, _rows_file(tmp_path / "plain_in.jsonl", without), str(plain), batch_size=2, seed=4) == 0
    got = {r["row"]: r for r in map(json.loads, mixed.read_text().splitlines())}
    before = {r["row"]: r for r in map(json.loads, plain.read_text().splitlines())}
    # The bad row: an error naming the file, the row and the field; the others are answered.
    assert got[2]["field"] == "sampling.temperature"
    assert got[2]["error"].startswith(f"{tmp_path / 'mixed_in.jsonl'} row 2: field 'sampling.temperature' must be")
    assert sorted(r for r in got if "error" not in got[r]) == [0, 1, 3, 4]
    # Rows without "sampling": the answers of the file without any.
    for i in (0, 3):
        assert got[i]["response"] == before[i]["response"] and "sampling" not in got[i]
    # The greedy row and the row with a seed, run again apart from the file (other slots, other mates): the greedy
    # row's answer (whatever its key) and the seeded row's, its settings with the key of seed 11 (= `answer --seed 11`
    # on that document alone); a row's answer never depends on its batch mates.
    from memagent_jax.sampling import row_keys

    greedy = agent.spec.answer_sampling.replace(temperature=0.0)
    mine = agent.spec.answer_sampling.replace(top_k=5, top_p=0.9)
    keys = jax.numpy.concatenate([row_keys(11, 1), row_keys(99, 1)])
    again = agent.run([questions[0], questions[1]], [docs[0], docs[1]], rng=keys, sampling=[mine, greedy], batch_size=2)
    assert got[1]["response"] == again.answers[1] and got[1]["sampling"] == {"temperature": 0.0}
    assert before[1]["response"] != got[1]["response"]  # sampled at temperature 1 it differs
    assert got[4]["response"] == again.answers[0]
    assert got[4]["sampling"] == {"temperature": 1.0, "top_p": 0.9, "top_k": 5, "seed": 11}
    assert before[4]["response"] != got[4]["response"]


@pytest.mark.faults
@pytest.mark.parametrize(
    "value, field, message",
    [
        ("hot", "sampling", "must be an object with temperature, top_p, top_k, seed"),
        ({"temprature": 0.5}, "sampling.temprature", "is not a sampling field; known: temperature, top_p, top_k"),
        ({"temperature": True}, "sampling.temperature", "must be a finite number >= 0"),
        ({"top_p": 0}, "sampling.top_p", r"must be a finite number in \(0, 1\]"),
        ({"top_k": 2.5}, "sampling.top_k", r"must be an integer >= 0 \(0 = off\), got 2.5"),
        ({"top_k": -1}, "sampling.top_k", "must be an integer >= 0"),
        ({"seed": "7"}, "sampling.seed", "must be an integer"),
        ({"seed": 2**64}, "sampling.seed", "must be an integer"),
    ],
)
def test_bad_row_sampling_names_the_field(value, field, message):
    from memagent_jax.data.records import DataFormatError
    from memagent_jax.evaluation.answering import row_sampling
    from memagent_jax.sampling import SamplingParams

    with pytest.raises(DataFormatError, match=message) as e:
        row_sampling(value, SamplingParams(), path="in.jsonl", row=3)
    assert e.value.field == field and str(e.value).startswith(f"in.jsonl row 3: field '{field}' ")
    assert row_sampling(None, None, path="in.jsonl", row=3) == (None, None, {})
    assert row_sampling({"seed": 5, "top_k": None}, SamplingParams(), path="in.jsonl", row=3) == (None, 5, {"seed": 5})
