"""Continuous batching of documents (agent.engine): same outputs as lockstep and as the plain loop, fewer steps."""

import numpy as np
import pytest

from hf_tiny import make_agent_model_dir
from memagent_jax.agent import AgentBudgets, AgentInputError, MemoryAgent, reference_run
from memagent_jax.agent.engine import DocumentEngine, RowProgress, RowRequest, RowResult
from memagent_jax.data.tokenizer import load_tokenizer
from memagent_jax.models import load_hf_params
from memagent_jax.sampling import SamplingParams
from memagent_jax.sampling.api import row_keys

BUDGETS = AgentBudgets(question_tokens=24, chunk_tokens=16, memory_tokens=12, answer_tokens=6, chunks_per_segment=2)
QUESTIONS = ["Where is the key?", "Which river flows past the old mill?", "Name it.", "What is the code?",
             "Who wrote the letter?", "When did the ferry leave?", "Why?"]
LENGTHS = [9, 140, 32, 75, 16, 200, 47]  # 1..13 chunks: rows end at different segments


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = make_agent_model_dir(tmp_path_factory.mktemp("engine") / "model", seed=5, vocab_size=400)
    tokenizer = load_tokenizer(folder)
    params, config = load_hf_params(folder)
    sampling = SamplingParams(temperature=0.9, top_p=0.95)
    agent = MemoryAgent(params, config, tokenizer, budgets=BUDGETS, memory_sampling=sampling)
    rng = np.random.default_rng(0)
    docs = [rng.integers(3, len(tokenizer), n).astype(np.int32) for n in LENGTHS]
    return dict(agent=agent, docs=docs, tokenizer=tokenizer)


def test_continuous_equals_lockstep_sampled_with_trace_and_record(setup):
    agent, docs = setup["agent"], setup["docs"]
    lockstep = agent.run(QUESTIONS, docs, rng=11, trace=True, record=True)
    for slots in (1, 3):
        cont = agent.run(QUESTIONS, docs, rng=11, trace=True, record=True, batch_size=slots)
        assert cont.answer_ids == lockstep.answer_ids, slots
        assert cont.answers == lockstep.answers
        assert cont.finished == lockstep.finished
        assert cont.num_chunks == lockstep.num_chunks == [-(-n // 16) for n in LENGTHS]
        assert cont.traces == lockstep.traces
        assert cont.nonfinite == lockstep.nonfinite
        for row in range(len(QUESTIONS)):
            a, b = cont.conversations[row], lockstep.conversations[row]
            assert [(c.kind, c.step) for c in a] == [(c.kind, c.step) for c in b]
            for x, y in zip(a, b):
                np.testing.assert_array_equal(x.prompt_ids, y.prompt_ids)
                np.testing.assert_array_equal(x.response_ids, y.response_ids)
                np.testing.assert_allclose(x.logprobs, y.logprobs, atol=1e-5)


def test_continuous_equals_plain_python_loop(setup):
    """An independent reference: the plain-Python agent loop, row by row, with the same row keys."""
    agent, docs = setup["agent"], setup["docs"]
    cont = agent.run(QUESTIONS, docs, rng=3, batch_size=2)
    for row in (0, 1, 5):
        ref = reference_run(agent, QUESTIONS[row], docs[row], rng=3, row=row)
        assert cont.answer_ids[row] == ref.answer_ids, row


def test_engine_refills_at_segment_boundaries_and_reads_fewer_segments(setup):
    """2 slots, documents of 13 and 1..5 chunks: lockstep pairs would run 7+3+2+1 segments; the engine keeps both
    slots busy, so it runs about half the rows' total segments."""
    agent, docs = setup["agent"], setup["docs"]
    keys = np.asarray(__import__("jax").random.key_data(row_keys(0, len(docs))))
    engine = DocumentEngine(agent, 2)
    seen = []
    results = engine.run((RowRequest(tag=i, question_ids=agent.prepare(QUESTIONS[i], docs[i])[0],
                                     document_ids=docs[i], key=keys[i]) for i in range(len(docs))),
                         on_event=seen.append)
    segments = [-(-(-(-n // 16)) // 2) for n in LENGTHS]  # segments per document: 1 5 1 3 1 7 2
    free_at = [0, 0]  # list scheduling by hand: each document goes to the slot that frees first, in queue order
    for s in segments:
        slot = free_at.index(min(free_at))
        free_at[slot] += s
    assert engine.segments_run == max(free_at) == 12
    lockstep_pairs = sum(max(segments[i:i + 2]) for i in range(0, len(segments), 2))
    assert lockstep_pairs == 17
    assert sorted(results) == list(range(len(docs)))
    progress = [e for e in seen if isinstance(e, RowProgress)]
    for tag in range(len(docs)):
        reads = [e.chunks_read for e in progress if e.tag == tag]
        assert reads == sorted(reads) and reads[-1] == -(-LENGTHS[tag] // 16)
    done = [e for e in seen if isinstance(e, RowResult)]
    assert len(done) == len(docs)  # none lost, none twice
    assert all(r.submitted_at <= r.started_at <= r.finished_at for r in done)
    assert not engine.busy


def test_engine_cancel_and_bad_requests(setup):
    agent, docs = setup["agent"], setup["docs"]
    key = np.zeros(2, np.uint32)
    engine = DocumentEngine(agent, 1, eager_answers=True)
    q = agent.prepare(QUESTIONS[0], docs[0])[0]
    with pytest.raises(AgentInputError, match="document is empty"):
        engine.submit(RowRequest(tag="x", question_ids=q, document_ids=np.zeros(0, np.int32), key=key))
    with pytest.raises(AgentInputError, match="question"):
        engine.submit(RowRequest(tag="x", question_ids=np.ones(25, np.int32), document_ids=docs[0], key=key))
    engine.submit(RowRequest(tag="long", question_ids=q, document_ids=docs[5], key=key))
    engine.submit(RowRequest(tag="short", question_ids=q, document_ids=docs[0], key=key))
    engine.step()  # 'long' occupies the only slot
    assert engine.reading == 1 and engine.queued == 1
    assert engine.cancel("long")
    assert not engine.cancel("nobody")
    tags = [e.tag for e in _drain(engine) if isinstance(e, RowResult)]
    assert tags == ["short"]  # the cancelled row freed its slot and was never answered
    single = agent.run([QUESTIONS[0]], [docs[0]], rng=np.asarray([key]))
    assert engine_answer(agent, q, docs[0], key) == single.answer_ids[0]


def engine_answer(agent, q, doc, key):
    engine = DocumentEngine(agent, 2, eager_answers=True)
    return engine.run([RowRequest(tag=0, question_ids=q, document_ids=doc, key=key)])[0].answer_ids


def _drain(engine):
    events = []
    while engine.busy:
        events += engine.step()
    return events


def test_evaluation_continuous_equals_bucketed(setup):
    from memagent_jax import evaluation as ev
    from memagent_jax.data.records import QARecord

    agent, tok = setup["agent"], setup["tokenizer"]
    records = [QARecord(question=QUESTIONS[i], document=tok.decode(setup["docs"][i].tolist()), answers=("x",),
                        index=10 + i) for i in range(len(QUESTIONS))]
    a = ev.evaluate_agent(agent, records, batch_size=3, num_traces=2, seed=4, progress=False, scheduling="bucketed")
    b = ev.evaluate_agent(agent, records, batch_size=3, num_traces=2, seed=4, progress=False)
    assert [r["response"] for r in a.rows] == [r["response"] for r in b.rows]
    assert [r.get("trace") for r in a.rows] == [r.get("trace") for r in b.rows]
    assert [r["num_chunks"] for r in a.rows] == [r["num_chunks"] for r in b.rows]
    with pytest.raises(ev.EvalConfigError, match="scheduling"):
        ev.evaluate_agent(agent, records, scheduling="fifo", progress=False)
