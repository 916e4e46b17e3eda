"""Scheduling of `MemoryAgent.run` (lockstep, bucketed, continuous) and continuous batching of documents
(agent.engine): every scheduling gives the outputs of lockstep and of the plain loop; the engine runs fewer steps."""

import subprocess
import sys

import numpy as np
import pytest

from hf_tiny import make_agent_model_dir
from memagent_jax.agent import (
    AgentBudgets,
    AgentInputError,
    AgentTemplates,
    MemoryAgent,
    choose_scheduling,
    reference_run,
)
from memagent_jax.agent.engine import DocumentEngine
from memagent_jax.agent.types import RowProgress, RowRequest, RowResult
from memagent_jax.data.tokenizer import load_tokenizer
from memagent_jax.models import load_hf_params
from memagent_jax.sampling import SamplingParams
from memagent_jax.sampling.api import row_keys

BUDGETS = AgentBudgets(question_tokens=24, chunk_tokens=16, memory_tokens=12, answer_tokens=6, chunks_per_segment=2)
QUESTIONS = [
    "Where is the key?",
    "Which river flows past the old mill?",
    "Name it.",
    "What is the code?",
    "Who wrote the letter?",
    "When did the ferry leave?",
    "Why?",
]
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
    return dict(agent=agent, docs=docs, tokenizer=tokenizer, params=params, config=config, sampling=sampling)


def assert_same_rows(got, want, *, nonfinite=True):
    """Two `AgentResult`s of the same rows and keys: the same answers, traces and conversations."""
    assert got.answer_ids == want.answer_ids
    assert got.answers == want.answers
    assert got.finished == want.finished
    assert got.num_chunks == want.num_chunks
    assert got.traces == want.traces
    if nonfinite:
        assert got.nonfinite == want.nonfinite
    for row in range(len(want.answers)):
        a, b = got.conversations[row], want.conversations[row]
        assert [(c.kind, c.step) for c in a] == [(c.kind, c.step) for c in b]
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x.prompt_ids, y.prompt_ids)
            np.testing.assert_array_equal(x.response_ids, y.response_ids)
            np.testing.assert_allclose(x.logprobs, y.logprobs, atol=1e-5)


def test_every_scheduling_equals_lockstep_sampled_with_trace_and_record(setup):
    agent, docs = setup["agent"], setup["docs"]
    lockstep = agent.run(QUESTIONS, docs, rng=11, trace=True, record=True, scheduling="lockstep")
    assert lockstep.num_chunks == [-(-n // 16) for n in LENGTHS]
    assert len({tuple(ids) for ids in lockstep.answer_ids}) > 1  # sampled: rows differ
    for scheduling, slots in (("continuous", 1), ("continuous", 3), ("bucketed", 3), ("bucketed", 7)):
        got = agent.run(QUESTIONS, docs, rng=11, trace=True, record=True, batch_size=slots, scheduling=scheduling)
        assert_same_rows(got, lockstep)
    # The default with a batch_size is continuous batching: same rows, and the engine's streamed rows.
    streamed = {}
    default = agent.run(
        QUESTIONS, docs, rng=11, trace=True, record=True, batch_size=3, on_row=lambda i, r: streamed.setdefault(i, r)
    )
    assert_same_rows(default, lockstep)
    assert sorted(streamed) == list(range(len(QUESTIONS)))
    assert [streamed[i].answer_ids[0] for i in range(len(QUESTIONS))] == lockstep.answer_ids


def test_scheduling_is_chosen_in_one_place_and_checked():
    """The default per batch_size / prompt mode / processes, and a clear error for a mode that cannot run."""
    choose = choose_scheduling
    assert choose(None, None, prompt_mode="pieces", processes=1) == "lockstep"
    assert choose(None, 4, prompt_mode="pieces", processes=1) == "continuous"
    assert choose(None, 4, prompt_mode="text", processes=1) == "bucketed"
    assert choose(None, 4, prompt_mode="pieces", processes=2) == "lockstep"
    assert choose(None, None, prompt_mode="text", processes=2) == "lockstep"
    assert choose("bucketed", 4, prompt_mode="pieces", processes=1) == "bucketed"
    assert choose("bucketed", 4, prompt_mode="text", processes=1) == "bucketed"
    assert choose("lockstep", None, prompt_mode="text", processes=2) == "lockstep"
    with pytest.raises(AgentInputError, match=r"scheduling='continuous' runs the piece prompt mode only.*'text'"):
        choose("continuous", 4, prompt_mode="text", processes=1)
    for mode in ("continuous", "bucketed"):
        with pytest.raises(AgentInputError, match=rf"scheduling='{mode}' runs on one process; .* spans 2 processes"):
            choose(mode, 4, prompt_mode="pieces", processes=2)
        for bad in (None, 0, -1, 2.5, True):
            with pytest.raises(AgentInputError, match=rf"scheduling='{mode}' needs batch_size >= 1"):
                choose(mode, bad, prompt_mode="pieces", processes=1)
    with pytest.raises(
        AgentInputError,
        match=r"scheduling='lockstep' runs all rows as one batch: batch_size must be "
        r"None, got 4",
    ):
        choose("lockstep", 4, prompt_mode="pieces", processes=1)
    with pytest.raises(AgentInputError, match=r"scheduling: must be one of \['lockstep', 'bucketed', 'continuous'\]"):
        choose("fifo", 4, prompt_mode="pieces", processes=1)


def test_run_refuses_a_scheduling_it_cannot_run(setup):
    agent, docs = setup["agent"], setup["docs"]
    with pytest.raises(AgentInputError, match="batch_size must be None"):
        agent.run(QUESTIONS[:2], docs[:2], scheduling="lockstep", batch_size=2)
    with pytest.raises(AgentInputError, match="needs batch_size"):
        agent.run(QUESTIONS[:2], docs[:2], scheduling="continuous")
    with pytest.raises(AgentInputError, match="must be one of"):
        agent.run(QUESTIONS[:2], docs[:2], scheduling="fifo", batch_size=2)


def test_text_mode_schedulings(setup):
    """Text prompt mode: bucketed (explicit, or the default with a batch_size) equals lockstep; continuous batching
    is refused with the reason."""
    text = MemoryAgent(
        setup["params"],
        setup["config"],
        setup["tokenizer"],
        budgets=BUDGETS,
        templates=AgentTemplates(prompt_mode="text"),
        memory_sampling=setup["sampling"],
    )
    questions, docs = QUESTIONS[:5], setup["docs"][:5]
    lockstep = text.run(questions, docs, rng=5, trace=True, record=True)
    assert lockstep.num_chunks == [-(-n // 16) for n in LENGTHS[:5]]
    for scheduling in ("bucketed", None):
        got = text.run(questions, docs, rng=5, trace=True, record=True, batch_size=2, scheduling=scheduling)
        assert_same_rows(got, lockstep, nonfinite=False)
    with pytest.raises(AgentInputError, match="piece prompt mode only"):
        text.run(questions, docs, rng=5, batch_size=2, scheduling="continuous")
    with pytest.raises(AgentInputError, match="piece prompt mode only"):
        text.document_engine(2)


def test_engine_depends_on_programs_types_chunking_and_placement_only():
    """Importing the engine does not import the runner (no cycle, no reach back into the driver)."""
    code = (
        "import sys, memagent_jax.agent.engine as e; "
        "assert 'memagent_jax.agent.runner' not in sys.modules, sorted(m for m in sys.modules if 'agent' in m); "
        "assert 'memagent_jax.agent.text_mode' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_engine_shares_the_agents_placement_and_cache_pool(setup):
    """An engine built from the agent's spec, params and placement gives the agent's answers, and gives its caches
    back to the pool the lockstep runs of the same batch take theirs from (one cache per program and batch)."""
    agent = MemoryAgent(
        setup["params"], setup["config"], setup["tokenizer"], budgets=BUDGETS, memory_sampling=setup["sampling"]
    )
    docs = setup["docs"]
    keys = np.asarray(__import__("jax").random.key_data(row_keys(2, 2)))
    engine = DocumentEngine(agent.spec, agent.params, agent.placement, 2)
    results = engine.run(
        RowRequest(tag=i, question_ids=agent.prepare(QUESTIONS[i], docs[i])[0], document_ids=docs[i], key=keys[i])
        for i in range(2)
    )
    assert len(agent.placement.pooled()) == 2  # the update and final caches of 2 rows
    assert [results[i].answer_ids for i in range(2)] == agent.run(QUESTIONS[:2], docs[:2], rng=2).answer_ids
    pooled = agent.placement.pooled()
    assert len(pooled) == 2 and all(c.positions.shape[0] == 2 for c in pooled)


def test_continuous_equals_plain_python_loop(setup):
    """An independent reference: the plain-Python agent loop, row by row, with the same row keys."""
    agent, docs = setup["agent"], setup["docs"]
    cont = agent.run(QUESTIONS, docs, rng=3, batch_size=2, scheduling="continuous")
    for row in (0, 1, 5):
        ref = reference_run(agent, QUESTIONS[row], docs[row], rng=3, row=row)
        assert cont.answer_ids[row] == ref.answer_ids, row


def test_engine_refills_at_segment_boundaries_and_reads_fewer_segments(setup):
    """2 slots, documents of 13 and 1..5 chunks: lockstep pairs would run 7+3+2+1 segments; the engine keeps both
    slots busy, so it runs about half the rows' total segments."""
    agent, docs = setup["agent"], setup["docs"]
    keys = np.asarray(__import__("jax").random.key_data(row_keys(0, len(docs))))
    engine = agent.document_engine(2)
    seen = []
    results = engine.run(
        (
            RowRequest(tag=i, question_ids=agent.prepare(QUESTIONS[i], docs[i])[0], document_ids=docs[i], key=keys[i])
            for i in range(len(docs))
        ),
        on_event=seen.append,
    )
    segments = [-(-(-(-n // 16)) // 2) for n in LENGTHS]  # segments per document: 1 5 1 3 1 7 2
    free_at = [0, 0]  # list scheduling by hand: each document goes to the slot that frees first, in queue order
    for s in segments:
        slot = free_at.index(min(free_at))
        free_at[slot] += s
    assert engine.segments_run == max(free_at) == 12
    lockstep_pairs = sum(max(segments[i : i + 2]) for i in range(0, len(segments), 2))
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
    engine = agent.document_engine(1, eager_answers=True)
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
    engine = agent.document_engine(2, eager_answers=True)
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
    records = [
        QARecord(question=QUESTIONS[i], document=tok.decode(setup["docs"][i].tolist()), answers=("x",), index=10 + i)
        for i in range(len(QUESTIONS))
    ]
    a = ev.evaluate_agent(agent, records, batch_size=3, num_traces=2, seed=4, progress=False, scheduling="bucketed")
    b = ev.evaluate_agent(agent, records, batch_size=3, num_traces=2, seed=4, progress=False)
    assert [r["response"] for r in a.rows] == [r["response"] for r in b.rows]
    assert [r.get("trace") for r in a.rows] == [r.get("trace") for r in b.rows]
    assert [r["num_chunks"] for r in a.rows] == [r["num_chunks"] for r in b.rows]
    with pytest.raises(ev.EvalConfigError, match="scheduling"):
        ev.evaluate_agent(agent, records, scheduling="fifo", progress=False)
