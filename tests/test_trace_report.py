"""The memory trace report: relevant sentences, memory changes, verdicts, escaping, collapsing, agent glue."""

import dataclasses
import html
import re

import pytest

from memagent_jax.evaluation.traces import TraceEntry, analyse_entry, entries_from_agent, write_trace_report

FILLER = (
    "The quiet river ran past the fields. Birds sang in the trees. A farmer walked home. The sky was grey. "
    "Rain fell softly. Nobody spoke."
)
NEEDLE = "The old mill stood by the Avon <script>alert(1)</script>. Its keeper, Mr. Hobbs, hid the key there."
SENTENCE = "The old mill stood by the Avon <script>alert(1)</script>."
QUESTION = "Which river flows past the old mill?"


def long_entry(**kwargs) -> TraceEntry:
    """42 steps: filler, the needle at step 3, filler (memory kept) until a last change at step 42."""
    chunks = [FILLER] * 2 + [NEEDLE] + [FILLER] * 39
    kept = "Mill on the Avon; key hidden there."
    memories = ["No notes yet."] * 2 + [kept] * 39 + [kept + " River quiet."]
    fields = dict(
        model="tiny-model",
        question=QUESTION,
        answers=["Avon", "River Avon"],
        chunks=chunks,
        memories=memories,
        prediction="\\boxed{Avon}",
        correct=True,
        metric=1.0,
        initial_memory="No notes yet.",
        label="index 7",
    )
    fields.update(kwargs)
    return TraceEntry(**fields)


def wrong_entry() -> TraceEntry:
    return TraceEntry(
        model="tiny-model",
        question="What colour is the door?",
        answers=["red"],
        chunks=["The door is red. It opens inward.", FILLER],
        memories=["door: red", "nothing"],
        prediction="\\boxed{blue}",
        correct=False,
        metric=0.0,
    )


def test_analysis_marks_relevant_sentences_and_memory_changes():
    views = analyse_entry(long_entry())
    assert len(views) == 42
    assert not views[0].relevant and views[0].num_sentences == 6 and not views[0].changed  # kept the initial memory
    assert views[0].excerpt.startswith("The quiet river")
    needle = views[2]
    assert needle.changed and needle.memory_gold == ["Avon"]
    [sentence] = [s for s in needle.relevant if s.gold]
    assert sentence.text == SENTENCE and sentence.words == ["mill", "old"]
    # "river" is everywhere in the document: not a rare question word; "Mr." does not end a sentence
    assert all("river" not in s.words for v in views for s in v.relevant)
    assert needle.num_sentences == 2
    assert [v.step for v in views if v.eventful] == [3, 42]
    wrong = analyse_entry(wrong_entry())
    assert wrong[0].relevant[0].gold == ["red"] and wrong[0].memory_gold == ["red"]
    assert wrong[1].changed and wrong[1].memory_gold == []  # the answer was lost from memory


def test_report_markdown_and_html(tmp_path):
    paths = write_trace_report(tmp_path / "sub" / "trace", [long_entry(), wrong_entry()], title="Tiny <eval> & co")
    assert paths == [str(tmp_path / "sub" / "trace.md"), str(tmp_path / "sub" / "trace.html")]
    md = open(paths[0], encoding="utf-8").read()
    page = open(paths[1], encoding="utf-8").read()
    for text in (md, page):
        assert QUESTION in text and "What colour is the door?" in text
        assert "correct (sub_em 1.00)" in text and "wrong (sub_em 0.00)" in text
        assert "steps 1-2: nothing relevant, memory kept" in text
        assert "steps 4-41: nothing relevant, memory kept (it holds the gold answer)" in text
        assert "1 of 2 sentences relevant" in text
        assert "2 questions, 1 correct (50.0%)" in text
    assert "Mill on the Avon; key hidden there." in md  # a memory
    assert 'Mill on the <mark class="gold">Avon</mark>; key hidden there.' in page
    # the last step of the wrong entry: nothing relevant, memory changed (the answer was lost)
    assert "Chunk: 6 sentences, none relevant: `'The quiet river ran past the fields.'`" in md
    assert "6 sentences, none relevant: &#x27;The quiet river ran past the fields.&#x27;" in page
    # Markdown: shown steps are headed, the collapsed ones are not
    assert re.findall(r"^#### Step (\d+) of", md, re.M) == ["3", "42", "1", "2"]
    assert f"- [gold answer: Avon; question words: mill, old] `{SENTENCE}`" in md
    assert "Memory after step 3 (changed; holds gold: `Avon`):" in md
    # HTML: self-contained, everything escaped, matches highlighted
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page and "src=" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<title>Tiny &lt;eval&gt; &amp; co</title>" in page
    assert (
        'The <mark class="word">old</mark> <mark class="word">mill</mark> stood by the <mark class="gold">Avon'
        "</mark> &lt;script&gt;alert(1)&lt;/script&gt;."
    ) in page
    assert page.count('<div class="step') == 4 and page.count('class="collapsed"') == 2
    assert '<span class="verdict wrong">' in page and '<span class="verdict correct">' in page
    # Markdown keeps document text in code spans: no raw HTML tag outside them
    for line in md.splitlines():
        if "script" in line:
            assert re.search(r"`[^`]*<script>alert\(1\)</script>[^`]*`", line), line


def test_script_in_relevant_sentence_is_escaped(tmp_path):
    entry = TraceEntry(
        model="m",
        question="Where is the key?",
        answers=["<b>stone</b>"],
        chunks=["The key lies under the <b>stone</b><script>x()</script>."],
        memories=["<script>x()</script> key: <b>stone</b>"],
        prediction="\\boxed{<b>stone</b>}",
        correct=True,
    )
    [md, page] = write_trace_report(tmp_path / "t", [entry], title="t")
    page = open(page, encoding="utf-8").read()
    assert "<script" not in page and "<b>" not in page
    blank = TraceEntry(
        model="m", question="q?", answers=["a"], chunks=["x"], memories=["\n\n"], prediction="", correct=False
    )
    [blank_md] = write_trace_report(tmp_path / "blank", [blank], title="t", formats=("md",))
    text = open(blank_md, encoding="utf-8").read()  # Markdown escapes the backslashes of '\n\n'
    assert "*(only whitespace: 2 characters '\\\\n\\\\n')*" in text and "*(empty)*" in text
    assert "&lt;script&gt;x()&lt;/script&gt;" in page
    assert "`The key lies under the <b>stone</b><script>x()</script>.`" in open(md, encoding="utf-8").read()


def test_formats_and_errors(tmp_path):
    assert write_trace_report(tmp_path / "only", [wrong_entry()], title="x", formats=("html",)) == [
        str(tmp_path / "only.html")
    ]
    assert not (tmp_path / "only.md").exists()
    with pytest.raises(ValueError, match="unknown report format"):
        write_trace_report(tmp_path / "x", [wrong_entry()], title="x", formats=("pdf",))
    with pytest.raises(ValueError, match="2 chunks but 1 memories"):
        TraceEntry(
            model="m", question="q", answers=["a"], chunks=["x", "y"], memories=["m"], prediction="", correct=False
        )


def test_hundreds_of_steps_stay_short(tmp_path):
    entry = long_entry(
        chunks=[FILLER] * 150 + [NEEDLE] + [FILLER] * 149, memories=["No notes yet."] * 150 + ["Avon mill."] * 150
    )
    [md] = write_trace_report(tmp_path / "long", [entry], title="long", formats=("md",))
    text = open(md, encoding="utf-8").read()
    assert "steps 1-150: nothing relevant, memory kept" in text
    assert "steps 152-300: nothing relevant, memory kept (it holds the gold answer)" in text
    assert "Final memory (the answer's only input):" in text  # the last steps were collapsed
    assert len(text.splitlines()) < 80


# ------------------------------------------------------------------------------------------- agent glue


@pytest.fixture(scope="module")
def agent_run(tmp_path_factory):
    from hf_tiny import make_agent_model_dir
    from memagent_jax.agent import AgentBudgets, MemoryAgent
    from memagent_jax.data.tokenizer import load_tokenizer
    from memagent_jax.models import load_hf_params

    folder = make_agent_model_dir(tmp_path_factory.mktemp("trace") / "model", seed=0, vocab_size=400)
    tokenizer = load_tokenizer(folder)
    params, config = load_hf_params(folder)
    budgets = AgentBudgets(question_tokens=24, chunk_tokens=16, memory_tokens=12, answer_tokens=6, chunks_per_segment=2)
    agent = MemoryAgent(params, config, tokenizer, budgets=budgets)
    records = [
        dict(question="Where is the key?", answers=["blue stone"], index=3),
        dict(input="Which river flows past the old mill?", answers=["Avon"]),
    ]
    documents = ["The key is under the blue stone. " + FILLER, FILLER + " The old mill stood by the Avon. " + FILLER]
    questions = [r.get("question", r.get("input")) for r in records]
    result = agent.run(questions, documents, rng=0, trace=True)
    doc_ids = [agent.prepare(q, d)[1] for q, d in zip(questions, documents)]
    return dict(
        agent=agent,
        tokenizer=tokenizer,
        result=result,
        records=records,
        documents=documents,
        doc_ids=doc_ids,
        budgets=budgets,
    )


def test_entries_from_agent_run(agent_run, tmp_path):
    r = agent_run
    result, tok = r["result"], r["tokenizer"]
    entries = entries_from_agent(
        tok,
        result,
        r["records"],
        r["doc_ids"],
        r["budgets"].chunk_tokens,
        model="tiny-qwen2",
        initial_memory="No notes yet.",
    )
    assert len(entries) == 2
    for i, entry in enumerate(entries):
        assert len(entry.chunks) == len(entry.memories) == result.num_chunks[i] > 1
        assert entry.memories == result.traces[i]
        assert "".join(entry.chunks) == r["documents"][i]  # byte-level BPE: the chunks decode back to the text
        assert entry.prediction == result.answers[i]
        assert entry.metric in (0.0, 1.0) and entry.correct == (entry.metric == 1.0)
    assert entries[0].question == "Where is the key?" and entries[0].label == "index 3"
    assert entries[1].question == "Which river flows past the old mill?" and entries[1].label == "row 1"
    md, page = write_trace_report(tmp_path / "agent", entries, title="tiny agent")
    text = open(page, encoding="utf-8").read()
    assert html.escape(entries[1].question) in text
    md_text = open(md, encoding="utf-8").read()
    for i in range(2):  # the first memory is always shown (changed from the initial one), and the final one
        assert result.traces[i][0].strip() and html.escape(result.traces[i][0]) in text
        assert result.traces[i][0] in md_text and result.traces[i][-1] in md_text
    assert "tiny-qwen2" in md_text
    # verdicts given by the caller win; errors name the problem
    forced = entries_from_agent(tok, result, r["records"], r["doc_ids"], 16, correct=[True, False])
    assert [e.correct for e in forced] == [True, False]
    with pytest.raises(ValueError, match="wrong chunk_tokens"):
        entries_from_agent(tok, result, r["records"], r["doc_ids"], 8)
    with pytest.raises(ValueError, match="trace=True"):
        entries_from_agent(tok, dataclasses.replace(result, traces=None), r["records"], r["doc_ids"], 16)
