"""Tests of the SQuAD-based RULER QA (qa_1-style) builder on small SQuAD-shaped files written here."""

import json
import re

import pytest

from memagent_jax.data import DocumentStore, open_file
from memagent_jax.data import squad as S
from memagent_jax.data.records import DataFormatError


def make_squad(num_articles=4, paragraphs=3, version="v2.0"):
    """Articles of `paragraphs` paragraphs; each paragraph has one answerable question (two answer texts) and,
    in v2.0, one unanswerable question."""
    data = []
    for a in range(num_articles):
        paras = []
        for p in range(paragraphs):
            ctx = f"Paragraph {a}-{p} says the keyword is kw{a}{p}."
            qas = [
                {
                    "id": f"q{a}{p}",
                    "question": f"What is the keyword of {a}-{p}?",
                    "answers": [{"text": f"kw{a}{p}", "answer_start": 0}, {"text": f"kw{a}{p}.", "answer_start": 0}],
                }
            ]
            if version == "v2.0":
                qas[0]["is_impossible"] = False
                qas.append(
                    {
                        "id": f"x{a}{p}",
                        "question": "Unanswerable?",
                        "answers": [],
                        "is_impossible": True,
                        "plausible_answers": [{"text": "no", "answer_start": 0}],
                    }
                )
            paras.append({"context": ctx, "qas": qas})
        data.append({"title": f"Article {a}", "paragraphs": paras})
    return {"version": version, "data": data}


def doc_names(document):
    return re.findall(r"Document \d+:\nParagraph (\d-\d) says", document)


@pytest.fixture()
def squad_file(tmp_path):
    path = tmp_path / "dev-v2.0.json"
    path.write_text(json.dumps(make_squad()))
    return path


def test_parse_v2_and_v1(tmp_path):
    questions, store = S.parse_squad(make_squad())
    assert [q.id for q in questions] == [f"q{a}{p}" for a in range(4) for p in range(3)]  # unanswerable left out
    assert questions[0].answers == ("kw00", "kw00.")
    assert list(store) == sorted(f"Paragraph {a}-{p} says the keyword is kw{a}{p}." for a in range(4) for p in range(3))
    q = questions[4]  # article 1, paragraph 1
    assert store[q.doc] == "Paragraph 1-1 says the keyword is kw11."
    assert sorted(store[d] for d in q.article_docs) == [f"Paragraph 1-{p} says the keyword is kw1{p}." for p in (0, 2)]
    v1, _ = S.parse_squad(make_squad(version="v1.1"))  # no is_impossible flag: all answerable
    assert [q.id for q in v1] == [q.id for q in questions]


def test_document_selection_rules(squad_file):
    b = S.SquadQABuilder.from_file(squad_file, seed=3)
    q = b.questions[4]  # gold 1-1; its article has 1-0 and 1-2
    for n in (1, 2, 3):  # at most the article: gold + n - 1 of its other paragraphs
        names = doc_names(b.document(q, n))
        assert len(names) == n and "1-1" in names and all(x.startswith("1-") for x in names)
    names = doc_names(b.document(q, 7))  # gold + whole article + 4 others
    assert len(names) == 7 == len(set(names)) and {"1-0", "1-1", "1-2"} <= set(names)
    assert sorted(doc_names(b.document(q, 100))) == sorted(f"{a}-{p}" for a in range(4) for p in range(3))
    # Deterministic, seeded, and shuffled.
    assert b.document(q, 7) == S.SquadQABuilder.from_file(squad_file, seed=3).document(q, 7)
    orders = {tuple(doc_names(S.SquadQABuilder.from_file(squad_file, seed=s).document(q, 12))) for s in range(6)}
    assert len(orders) > 1
    with pytest.raises(ValueError):
        b.document(q, 0)


def test_document_text_by_hand():
    questions, store = S.parse_squad(make_squad(num_articles=1, paragraphs=2))
    b = S.SquadQABuilder(questions, store, seed=0)
    ids = b.document_ids(questions[0], 2)
    expected = "Document 1:\n" + store[ids[0]] + "\n\nDocument 2:\n" + store[ids[1]]
    assert b.document(questions[0], 2) == expected
    assert sorted(ids) == [0, 1]


def test_eval_suite_loads_and_shares_questions(squad_file, tmp_path):
    b = S.SquadQABuilder.from_file(squad_file, seed=0)
    paths = b.write_eval_suite(tmp_path / "out", doc_counts=(2, 5), num_questions=5)
    assert sorted(paths) == [2, 5]
    for n, path in paths.items():
        assert path.name == f"eval_{n}docs.json"
        recs = list(open_file(path))
        assert [r.question for r in recs] == [q.question for q in b.questions[:5]]  # file order, as RULER
        assert [r.index for r in recs] == list(range(5))
        for r, q in zip(recs, b.questions):
            assert r.answers == q.answers and r.extra["num_docs"] == n and r.extra["id"] == q.id
            assert len(doc_names(r.document)) == n
            assert b.store[q.doc].split(" says")[0] in r.document


def test_store_matches_the_docstore_rebuilt_from_the_same_file(squad_file):
    _, store = S.load_squad(squad_file)
    assert list(store) == list(DocumentStore.load(squad_file))


def test_bad_entries_collected_or_raised(tmp_path):
    data = make_squad()
    data["data"][1]["paragraphs"][2]["qas"][0]["answers"] = []
    data["data"][2]["paragraphs"][0]["qas"][0]["question"] = 7
    data["data"][3]["paragraphs"][1]["context"] = None
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(DataFormatError) as e:
        S.load_squad(path)
    assert e.value.field == "data[3].paragraphs[1].context" and e.value.path == str(path)  # paragraphs first
    errors = []
    questions, store = S.load_squad(path, errors)
    fields = [err.field for err in errors]
    assert fields == [
        "data[3].paragraphs[1].context",
        "data[1].paragraphs[2].qas[0].answers",
        "data[2].paragraphs[0].qas[0].question",
    ]
    assert [err.row for err in errors] == [None, 10, 12]  # position among the file's questions (2 per paragraph)
    assert len(questions) == 12 - 3 and len(store) == 11
    with pytest.raises(DataFormatError, match="SQuAD object"):
        S.parse_squad([1, 2], "x.json")
