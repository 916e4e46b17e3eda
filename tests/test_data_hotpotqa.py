"""Tests of the HotpotQA long-document builder on a small HotpotQA-shaped file."""

import json
import random
import re

import pytest

from memagent_jax.data import formats as F
from memagent_jax.data import hotpotqa as H
from memagent_jax.data.records import DataFormatError


def make_raw(num_questions=12, seed=0):
    """A HotpotQA-shaped list: each question has 2 gold + 3 distractor paragraphs of its own."""
    rng = random.Random(seed)
    data = []
    for q in range(num_questions):
        paras = []
        for p in range(5):
            title = f"Title {q}-{p}"
            sentences = [f"Sentence one of {q}-{p} mentions {rng.randrange(1000)}.", f" Sentence two of {q}-{p}."]
            paras.append([title, sentences])
        rng.shuffle(paras)
        gold = [paras[0][0], paras[1][0]]
        data.append(
            {
                "_id": f"id{q:03d}",
                "question": f"Question number {q}?",
                "answer": f"answer {q}",
                "supporting_facts": [[gold[0], 0], [gold[1], 1]],
                "context": paras,
                "type": "bridge",
                "level": "easy",
            }
        )
    return data


@pytest.fixture()
def raw_file(tmp_path):
    path = tmp_path / "hotpot_dev_distractor.json"
    path.write_text(json.dumps(make_raw()))
    return path


def doc_titles(document: str):
    return re.findall(r"Document \d+:\n(Title \d+-\d)\n", document)


def test_load_and_document_shape(raw_file):
    examples = H.load_hotpotqa(raw_file)
    assert len(examples) == 12
    ex = examples[0]
    assert len(ex.paragraphs) == 5 and len(ex.gold_titles) == 2
    # sentences joined as written (their own leading spaces), stripped
    title, text = ex.paragraphs[0]
    assert (
        text
        == f"Sentence one of {title[6:]} mentions "
        + text.split("mentions ")[1].split(".")[0]
        + f". Sentence two of {title[6:]}."
    )
    b = H.HotpotQABuilder(examples, seed=1)
    assert len(b.pool_titles) == 60
    doc = b.document(ex, 20)
    titles = doc_titles(doc)
    assert len(titles) == 20 and len(set(titles)) == 20
    assert re.findall(r"Document (\d+):", doc) == [str(i) for i in range(1, 21)]
    own = {t for t, _ in ex.paragraphs}
    assert own <= set(titles)  # gold and its distractors are all there
    assert doc.startswith("Document 1:\n")
    assert "\n\nDocument 2:\n" in doc


def test_format_documents():
    assert (
        H.format_documents([("A", "text a."), ("B", "text b.")]) == "Document 1:\nA\ntext a.\n\nDocument 2:\nB\ntext b."
    )


def test_deterministic_and_seeded(raw_file):
    ex = H.load_hotpotqa(raw_file)
    a = list(H.HotpotQABuilder(ex, seed=3).training_rows(num_docs=15))
    b = list(H.HotpotQABuilder(H.load_hotpotqa(raw_file), seed=3).training_rows(num_docs=15))
    c = list(H.HotpotQABuilder(ex, seed=4).training_rows(num_docs=15))
    assert a == b
    assert [r["context"] for r in a] != [r["context"] for r in c]


def test_fewer_docs_keeps_gold(raw_file):
    ex = H.load_hotpotqa(raw_file)[2]
    b = H.HotpotQABuilder(H.load_hotpotqa(raw_file))
    titles = doc_titles(b.document(ex, 3))
    assert len(titles) == 3 and set(ex.gold_titles) <= set(titles)
    with pytest.raises(ValueError, match="gold"):
        b.document(ex, 1)
    with pytest.raises(ValueError, match="only 55 other paragraphs"):
        b.document(ex, 61)


def test_padding_nested_across_lengths(raw_file):
    examples = H.load_hotpotqa(raw_file)
    b = H.HotpotQABuilder(examples, seed=0)
    for ex in examples[:4]:
        small, large = set(doc_titles(b.document(ex, 10))), set(doc_titles(b.document(ex, 40)))
        assert small < large
        full = set(doc_titles(b.document(ex, 60)))  # the whole split
        assert full == set(b.pool_titles)


def test_training_rows_format(raw_file, tmp_path):
    b = H.HotpotQABuilder.from_file(raw_file, seed=0)
    path = tmp_path / "train.parquet"
    assert b.write_training_file(path, num_docs=12, limit=5) == 5
    recs = F.read_records(path)
    assert [r.question for r in recs] == [f"Question number {q}?" for q in range(5)]
    assert recs[1].answers == ("answer 1",) and recs[1].index == 1 and recs[1].data_source == "hotpotqa"
    assert recs[1].extra["_id"] == "id001" and recs[1].extra["num_docs"] == 12
    assert len(doc_titles(recs[1].document)) == 12
    row = F.open_file(path).row(0)
    assert row["prompt"] == [{"role": "user", "content": "Question number 0?"}]
    assert row["reward_model"] == {"style": "rule", "ground_truth": ["answer 0"]}


def test_eval_suite_same_questions(raw_file, tmp_path):
    b = H.HotpotQABuilder.from_file(raw_file, seed=7)
    paths = b.write_eval_suite(tmp_path / "eval", doc_counts=(10, 20, 40), num_questions=6)
    assert sorted(paths) == [10, 20, 40]
    per_len = {n: F.read_records(p) for n, p in paths.items()}
    questions = [r.question for r in per_len[10]]
    assert len(questions) == 6 and len(set(questions)) == 6
    for n, recs in per_len.items():
        assert paths[n].name == f"eval_{n}docs.json"
        assert [r.question for r in recs] == questions
        assert [r.index for r in recs] == list(range(6))
        for r in recs:
            assert r.extra["num_docs"] == n and len(doc_titles(r.document)) == n
            assert r.answers == (f"answer {int(r.question.split()[-1][:-1])}",)
    # the same seed chooses the same questions again
    assert [e.question for e in b.eval_questions(6)] == questions


BAD_RAW = [
    (lambda d: d[3].pop("answer"), 3, "answer"),
    (lambda d: d[1].__setitem__("context", [["T", "not a list"]]), 1, "context[0]"),
    (lambda d: d[2]["context"][0][1].__setitem__(0, 5), 2, "context[0][1][0]"),
    (lambda d: d[0].__setitem__("supporting_facts", [["Nowhere", 0]]), 0, "supporting_facts[0]"),
    (lambda d: d[4].__setitem__("supporting_facts", []), 4, "supporting_facts"),
]


@pytest.mark.parametrize("mutate,row,field", BAD_RAW)
def test_malformed_raw_named(tmp_path, mutate, row, field):
    data = make_raw(6)
    mutate(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(DataFormatError) as err:
        H.load_hotpotqa(path)
    assert (err.value.path, err.value.row, err.value.field) == (str(path), row, field)
