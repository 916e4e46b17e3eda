"""Files shaped exactly as the reference's data scripts write them load unchanged.

Each file is written here the way MemAgent's `taskutils/memory_data` scripts write it (pandas `to_parquet` of the
training rows; `json.dump(..., indent=4)` of evaluation rows; RULER rows with `outputs`; index-list `context` at
12800+ documents, pointing into the document list rebuilt from the raw HotpotQA / SQuAD file).  The expected
document text is computed here independently: the raw paragraphs, de-duplicated, sorted, numbered.
"""

import json
import random

import pandas as pd
import pytest

from memagent_jax.data import DataFormatError, DocumentStore, open_file
from memagent_jax.data.docstore import number_documents

# A tiny raw HotpotQA dev file (distractor setting): sentences keep their leading spaces, as in HotpotQA.
RAW_HOTPOT = [
    {
        "_id": "q0",
        "question": "Which band was formed first?",
        "answer": "Alpha",
        "type": "comparison",
        "level": "easy",
        "supporting_facts": [["Alpha (band)", 0], ["Beta (band)", 0]],
        "context": [
            ["Alpha (band)", ["Alpha is a band.", " It formed in 1970."]],
            ["Beta (band)", ["Beta is a band.", " It formed in 1980."]],
            ["Gamma", ["Gamma is a letter."]],
        ],
    },
    {
        "_id": "q1",
        "question": "Where was Delta born?",
        "answer": "Oslo",
        "type": "bridge",
        "level": "hard",
        "supporting_facts": [["Delta", 0]],
        "context": [
            ["Delta", ["Delta was born in Oslo."]],
            ["Gamma", ["Gamma is a letter."]],  # shared with q0: one store entry
            ["Epsilon", ["Epsilon ", "has two parts."]],
        ],
    },
]


def _hotpot_docs():
    """The store by hand: '<title>\\n<sentences concatenated>' for every paragraph, unique, sorted."""
    docs = {title + "\n" + "".join(sents) for q in RAW_HOTPOT for title, sents in q["context"]}
    return sorted(docs)


def _numbered(docs):
    out = []
    for i, d in enumerate(docs):
        out.append("Document " + str(i + 1) + ":\n" + d)
    return "\n\n".join(out)


@pytest.fixture
def raw_hotpot(tmp_path):
    path = tmp_path / "hotpotqa_dev.json"
    path.write_text(json.dumps(RAW_HOTPOT))
    return path


def test_store_from_raw_hotpotqa_matches_hand_construction(raw_hotpot):
    store = DocumentStore.load(raw_hotpot)
    assert list(store) == _hotpot_docs()
    assert len(store) == 5  # Gamma appears twice in the raw file, once in the store
    assert store[0] == "Alpha (band)\nAlpha is a band. It formed in 1970."
    assert "Epsilon\nEpsilon has two parts." in list(store)
    assert number_documents(["a", "b"]) == "Document 1:\na\n\nDocument 2:\nb"


def test_training_parquet_as_written_by_pandas(tmp_path):
    """Training rows as the reference's processing script writes them (an extra 'ability' column, extra_info with
    index / question / num_docs), through pandas.DataFrame.to_parquet."""
    docs = _hotpot_docs()
    rows = []
    for index, q in enumerate(RAW_HOTPOT):
        rows.append(
            {
                "data_source": "hotpotqa",
                "prompt": [{"role": "user", "content": q["question"]}],
                "context": _numbered(docs[:3]),
                "ability": "memory",
                "reward_model": {"style": "rule", "ground_truth": [q["answer"]]},
                "extra_info": {"index": index, "question": q["question"], "num_docs": 200},
            }
        )
    path = tmp_path / "hotpotqa_train_process.parquet"
    pd.DataFrame(rows).to_parquet(path)
    f = open_file(path)
    assert f.kind == "train" and len(f) == 2
    rec = f[1]
    assert rec.question == "Where was Delta born?"
    assert rec.answers == ("Oslo",)
    assert rec.document == _numbered(docs[:3])
    assert rec.index == 1 and rec.data_source == "hotpotqa"
    assert rec.extra["num_docs"] == 200 and rec.extra["reward_style"] == "rule"


def test_eval_json_at_50_docs(tmp_path):
    """Evaluation rows with the text in 'context', json.dump with indent=4 and ensure_ascii=False."""
    docs = _hotpot_docs()
    rows = [
        {
            "context": _numbered(docs[:4]) + " café",
            "input": q["question"],
            "answers": [q["answer"]],
            "num_docs": 50,
            "index": 7 + i,
        }
        for i, q in enumerate(RAW_HOTPOT)
    ]
    path = tmp_path / "eval_50.json"
    path.write_text(json.dumps(rows, ensure_ascii=False, indent=4), encoding="utf-8")
    f = open_file(path)
    assert f.kind == "eval"
    assert [r.index for r in f] == [7, 8]
    assert f[0].document.endswith(" café") and f[0].extra["num_docs"] == 50
    assert f[1].answers == ("Oslo",)


def _index_rows(num_docs, seed):
    """Rows as the reference writes them past 10000 documents: the question's documents (here: all the store,
    as when num_docs exceeds it, or a sample of num_docs) as indices, shuffled."""
    docs = _hotpot_docs()
    rows = []
    for index, q in enumerate(RAW_HOTPOT):
        if num_docs >= len(docs):
            ids = list(range(len(docs)))
        else:
            own = [docs.index(t + "\n" + "".join(s)) for t, s in q["context"]]
            rest = [i for i in range(len(docs)) if i not in own]
            ids = own + random.Random(seed + index).sample(rest, max(0, num_docs - len(own)))
        random.Random(4).shuffle(ids)
        rows.append(
            {"context": ids, "input": q["question"], "answers": [q["answer"]], "num_docs": num_docs, "index": index}
        )
    return rows


@pytest.mark.parametrize("num_docs", [12800, 4])
def test_eval_json_at_12800_docs_with_index_list_and_store(tmp_path, raw_hotpot, num_docs):
    rows = _index_rows(num_docs, seed=1)
    path = tmp_path / f"eval_{num_docs}.json"
    path.write_text(json.dumps(rows, ensure_ascii=False, indent=4))
    docs = _hotpot_docs()
    for store in (raw_hotpot, DocumentStore.load(raw_hotpot), docs):  # a path, a store, a list of strings
        f = open_file(path, doc_store=store)
        assert f.kind == "eval" and len(f) == 2
        for row, rec in zip(rows, f):
            assert rec.document == _numbered([docs[i] for i in row["context"]])
            assert rec.extra["num_docs"] == num_docs  # the row's own field wins over the list's length
            assert rec.question == row["input"] and rec.answers == tuple(row["answers"])
    # A store written as a JSON array of documents serves as well.
    written = DocumentStore(docs).write(tmp_path / "store.json")
    assert open_file(path, doc_store=written)[0].document == _numbered([docs[i] for i in rows[0]["context"]])


def test_index_list_errors_name_file_row_and_field(tmp_path, raw_hotpot):
    rows = _index_rows(12800, seed=0)
    path = tmp_path / "eval_12800.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(DataFormatError) as e:
        open_file(path)[0]
    assert e.value.field == "context" and e.value.row == 0 and "document store" in str(e.value)
    rows[1]["context"][3] = 99
    path.write_text(json.dumps(rows))
    f = open_file(path, doc_store=raw_hotpot)
    f[0]
    with pytest.raises(DataFormatError) as e:
        f[1]
    assert (e.value.row, e.value.field) == (1, "context[3]") and "outside the document store" in str(e.value)
    assert str(path) in str(e.value)
    rows[1]["context"] = {"not": "a list"}
    with pytest.raises(DataFormatError) as e:
        from memagent_jax.data.formats import record_from_eval_row

        record_from_eval_row(rows[1], path="x.json", index=1, doc_store=DocumentStore(["a"]))
    assert e.value.field == "context"
    with pytest.raises(FileNotFoundError):
        open_file(path, doc_store=tmp_path / "missing.json")


def test_bad_store_named(tmp_path):
    bad = tmp_path / "bad_hotpot.json"
    bad.write_text(json.dumps([{"context": [["title", "not a list"]]}]))
    with pytest.raises(DataFormatError) as e:
        DocumentStore.load(bad)
    assert (e.value.row, e.value.field) == (0, "context[0]")
    bad.write_text(json.dumps({"data": [{"paragraphs": [{"context": 3}]}]}))
    with pytest.raises(DataFormatError) as e:
        DocumentStore.load(bad)
    assert e.value.field == "data[0].paragraphs[0].context"
    bad.write_text("{not json")
    with pytest.raises(DataFormatError, match="not valid JSON"):
        DocumentStore.load(bad)


RAW_SQUAD = {
    "version": "v2.0",
    "data": [
        {
            "title": "T1",
            "paragraphs": [
                {
                    "context": "Zeta paragraph about rivers.",
                    "qas": [
                        {
                            "id": "a",
                            "question": "What is it about?",
                            "is_impossible": False,
                            "answers": [
                                {"text": "rivers", "answer_start": 22},
                                {"text": "rivers.", "answer_start": 22},
                            ],
                        }
                    ],
                },
                {"context": "Alpha paragraph about hills.", "qas": []},
            ],
        },
        {"title": "T2", "paragraphs": [{"context": "Mid paragraph.", "qas": []}]},
    ],
}


def test_ruler_json_with_outputs(tmp_path):
    """RULER rows: index, input (the task template around the question), context text, outputs, answer_prefix."""
    rows = [
        {
            "index": 0,
            "input": "Answer the question based on the given documents. What is it about?",
            "context": "Document 1:\nZeta paragraph about rivers.",
            "outputs": ["rivers", "rivers."],
            "answer_prefix": " Answer:",
        }
    ]
    path = tmp_path / "eval_qa_1_8192.json"
    path.write_text(json.dumps(rows, indent=4))
    f = open_file(path)
    assert f.kind == "eval"
    rec = f[0]
    assert rec.answers == ("rivers", "rivers.")
    assert rec.document == "Document 1:\nZeta paragraph about rivers."
    assert rec.extra == {"answer_prefix": " Answer:"}
    # A row with neither key names 'answers' and mentions 'outputs'.
    path.write_text(json.dumps([{"index": 0, "input": "q", "context": "d"}]))
    with pytest.raises(DataFormatError, match="outputs") as e:
        open_file(path)[0]
    assert e.value.field == "answers"


def test_ruler_json_with_outputs_and_index_list_into_squad_store(tmp_path):
    """Past 2M tokens RULER qa_1 rows store indices into the SQuAD paragraph list (unique contexts, sorted)."""
    squad = tmp_path / "squad.json"
    squad.write_text(json.dumps(RAW_SQUAD))
    docs = sorted({"Zeta paragraph about rivers.", "Alpha paragraph about hills.", "Mid paragraph."})
    rows = [
        {
            "index": 0,
            "input": "Answer the question based on the given documents. What is it about?",
            "context": [2, 0, 1],
            "outputs": ["rivers", "rivers."],
            "answer_prefix": " Answer:",
        }
    ]
    path = tmp_path / "eval_qa_1_4194304.json"
    path.write_text(json.dumps(rows, indent=4))
    rec = open_file(path, doc_store=squad)[0]
    assert rec.document == _numbered([docs[2], docs[0], docs[1]])
    assert rec.document.startswith("Document 1:\nZeta paragraph about rivers.\n\nDocument 2:\nAlpha")
    assert rec.extra["num_docs"] == 3 and rec.answers == ("rivers", "rivers.")


def test_evaluate_opens_index_list_files_with_the_configured_store(tmp_path, raw_hotpot):
    from memagent_jax.evaluation import open_eval_file

    rows = _index_rows(12800, seed=0)
    path = tmp_path / "eval_12800.json"
    path.write_text(json.dumps(rows))
    rec = open_eval_file(str(path), DocumentStore.load(raw_hotpot))[1]
    assert rec.document == _numbered([_hotpot_docs()[i] for i in rows[1]["context"]])
