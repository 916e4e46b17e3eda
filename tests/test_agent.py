"""The memory agent: chunk scan vs the plain-Python loop, vs transformers, compile count, bad input."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from hf_tiny import make_agent_model_dir
from memagent_jax.agent import AgentBudgets, AgentInputError, MemoryAgent, program, read_document_file, reference_run
from memagent_jax.data.tokenizer import load_tokenizer
from memagent_jax.models import init_cache, load_hf_params
from memagent_jax.sampling import SamplingParams
from memagent_jax.sampling.sampler import prefill

BUDGETS = AgentBudgets(question_tokens=24, chunk_tokens=16, memory_tokens=12, answer_tokens=6, chunks_per_segment=2)
TOL = 1e-4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = make_agent_model_dir(tmp_path_factory.mktemp("agent") / "model", seed=3, vocab_size=400)
    tokenizer = load_tokenizer(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    params, config = load_hf_params(folder)
    return dict(tokenizer=tokenizer, model=model, params=params, config=config)


def make_agent(setup, **kwargs):
    kwargs.setdefault("budgets", BUDGETS)
    return MemoryAgent(setup["params"], setup["config"], setup["tokenizer"], **kwargs)


def document(n_tokens: int, tokenizer, seed: int) -> np.ndarray:
    """A document of exactly n_tokens ids (ordinary vocabulary, no special tokens)."""
    rng = np.random.default_rng(seed)
    return rng.integers(3, len(tokenizer), n_tokens).astype(np.int32)


QUESTIONS = ["Where is the key?", "Which river flows past the old mill?", "Name it.", "What is the code?"]


def docs_of_lengths(tokenizer):
    # 1 chunk (partial), 3 chunks (partial last), exactly 2 chunks, 5 chunks (3 segments)
    return [document(n, tokenizer, i) for i, n in enumerate([9, 40, 32, 75])]


def test_chunk_scan_equals_reference_loop_greedy(setup):
    agent = make_agent(setup)
    docs = docs_of_lengths(setup["tokenizer"])
    result = agent.run(QUESTIONS, docs, rng=7, trace=True)
    assert result.num_chunks == [1, 3, 2, 5]
    for row, (q, d) in enumerate(zip(QUESTIONS, docs)):
        ref = reference_run(agent, q, d, rng=7, row=row)
        assert result.answer_ids[row] == ref.answer_ids, row
        assert len(result.traces[row]) == len(ref.steps)
        for step, text in zip(ref.steps, result.traces[row]):
            assert text == setup["tokenizer"].decode(step.memory_ids, skip_special_tokens=True)
        assert result.answers[row] == ref.answer_text


def test_stop_tokens_shorten_memory_like_reference(setup):
    """A frequent token made a stop id: memories end early and still match the reference."""
    base = make_agent(setup)
    docs = docs_of_lengths(setup["tokenizer"])
    traces = base.run(QUESTIONS, docs, rng=0, record=True).conversations
    responses = np.concatenate([c.response_ids for conv in traces for c in conv])
    common = int(np.bincount(responses).argmax())
    agent = make_agent(setup, stop_token_ids=(2, common))
    result = agent.run(QUESTIONS, docs, rng=0, record=True)
    memory_lengths = [len(c.response_ids) for conv in result.conversations for c in conv if c.kind == "memory"]
    assert min(memory_lengths) < BUDGETS.memory_tokens  # the stop path was exercised
    for row, (q, d) in enumerate(zip(QUESTIONS, docs)):
        ref = reference_run(agent, q, d, rng=0, row=row)
        got = [c for c in result.conversations[row] if c.kind == "memory"]
        assert [c.response_ids.tolist() for c in got] == [s.response_ids for s in ref.steps]
        assert [c.prompt_ids.tolist() for c in got] == [s.prompt_ids for s in ref.steps]
        assert result.answer_ids[row] == ref.answer_ids


def test_sampled_rows_independent_of_batch_and_match_reference(setup):
    sampling = SamplingParams(temperature=1.0, top_p=0.9)
    agent = make_agent(setup, memory_sampling=sampling)
    docs = docs_of_lengths(setup["tokenizer"])
    batch = agent.run(QUESTIONS, docs, rng=11, trace=True)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(11), i))(jnp.arange(4, dtype=jnp.uint32))
    alone = agent.run(QUESTIONS[1:2], docs[1:2], rng=keys[1:2], trace=True)
    assert alone.traces[0] == batch.traces[1]
    assert alone.answer_ids[0] == batch.answer_ids[1]
    ref = reference_run(agent, QUESTIONS[3], docs[3], rng=11, row=3)
    assert batch.traces[3] == [setup["tokenizer"].decode(s.memory_ids, skip_special_tokens=True) for s in ref.steps]


def test_static_prompt_logits_equal_transformers_unpadded(setup):
    """Prefix prefilled once + rest prefilled after a rewind: next-token logits of each row equal
    transformers' on that row's unpadded prompt (rows with different question/memory/chunk lengths)."""
    agent = make_agent(setup)
    spec, tok, model = agent.spec, setup["tokenizer"], setup["model"]
    b = BUDGETS
    rng = np.random.default_rng(1)
    q_lens, m_lens, c_lens = [5, 24], [12, 2], [16, 7]
    question = np.zeros((2, b.question_tokens), np.int32)
    memory = np.zeros((2, b.memory_tokens), np.int32)
    chunk = np.zeros((2, b.chunk_tokens), np.int32)
    for i in range(2):
        question[i, : q_lens[i]] = rng.integers(3, len(tok), q_lens[i])
        memory[i, : m_lens[i]] = rng.integers(3, len(tok), m_lens[i])
        chunk[i, : c_lens[i]] = rng.integers(3, len(tok), c_lens[i])
    params, config = setup["params"], setup["config"]
    for step in range(2):  # the second step reuses the same prefix after a rewind
        if step == 0:
            prefix = program.prefill_prefix(
                params, spec, jnp.asarray(question), jnp.asarray(q_lens), init_cache(config, 2, spec.update_cache_slots)
            )
            cache = prefix.cache
        else:
            chunk = np.roll(chunk, 3, axis=1)
        u = spec.prompts.update.pieces
        rest, rest_mask = program.assemble(
            [(jnp.asarray(memory), jnp.asarray(m_lens)), u[2], (jnp.asarray(chunk), jnp.asarray(c_lens)), u[3]],
            2,
            spec.pad_id,
        )
        from memagent_jax.models import rewind_cache

        pre = prefill(
            params,
            config,
            rest,
            rest_mask,
            rewind_cache(cache, spec.prefix_length),
            start_positions=prefix.next_positions,
        )
        cache = pre.cache
        for i in range(2):
            ids = spec.prompts.update.assemble(
                {"question": question[i, : q_lens[i]], "memory": memory[i, : m_lens[i]], "chunk": chunk[i, : c_lens[i]]}
            )
            with torch.no_grad():
                ref = model(input_ids=torch.tensor([ids])).logits[0, -1].numpy()
            assert np.abs(np.asarray(pre.last_logits[i]) - ref).max() <= TOL
            assert int(pre.next_positions[i]) == len(ids)


def test_recorded_logprobs_equal_transformers_teacher_forced(setup):
    agent = make_agent(setup, memory_sampling=SamplingParams(temperature=1.0))
    docs = docs_of_lengths(setup["tokenizer"])[:2]
    result = agent.run(QUESTIONS[:2], docs, rng=5, record=True)
    model = setup["model"]
    checked = 0
    for conversations in result.conversations:
        assert [c.kind for c in conversations][-1] == "final"
        for conv in conversations:
            ids = np.concatenate([conv.prompt_ids, conv.response_ids])
            with torch.no_grad():
                logits = model(input_ids=torch.tensor(ids[None], dtype=torch.long)).logits[0]
            lp = torch.log_softmax(logits.double(), -1).numpy()
            p = len(conv.prompt_ids)
            ref = lp[np.arange(p - 1, len(ids) - 1), conv.response_ids]
            assert np.abs(conv.logprobs - ref).max() <= TOL
            checked += 1
    assert checked == sum(result.num_chunks) + 2


def test_one_compile_serves_2_8_and_64_chunks(setup):
    budgets = AgentBudgets(question_tokens=16, chunk_tokens=4, memory_tokens=12, answer_tokens=4, chunks_per_segment=4)
    agent = make_agent(setup, budgets=budgets)
    tok = setup["tokenizer"]
    agent.run(["q?"], [document(8, tok, 0)])  # 2 chunks: compiles
    sizes = (
        program.segment_program._cache_size(),
        program.final_program._cache_size(),
        program.prefix_program._cache_size(),
    )
    for n_chunks in (8, 64):
        result = agent.run(["q?"], [document(4 * n_chunks, tok, n_chunks)])
        assert result.num_chunks == [n_chunks]
    assert (
        program.segment_program._cache_size(),
        program.final_program._cache_size(),
        program.prefix_program._cache_size(),
    ) == sizes


def test_bad_input_errors(setup, tmp_path):
    agent = make_agent(setup)
    tok = setup["tokenizer"]
    good = document(20, tok, 0)
    with pytest.raises(AgentInputError, match=r"row 1: document: the document is empty"):
        agent.run(["q?", "q?"], [good, ""])
    with pytest.raises(AgentInputError, match=r"row 0: question: the question is empty"):
        agent.run(["  "], [good])
    with pytest.raises(AgentInputError, match=r"row 0: question: the question has \d+ tokens, over the budget of 24"):
        agent.run(["word " * 40], [good])
    truncating = make_agent(setup, budgets=AgentBudgets(**{**BUDGETS.__dict__, "question_overflow": "truncate"}))
    assert truncating.run(["word " * 40], [good]).num_chunks == [2]
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine text \xff\xfe more")
    with pytest.raises(AgentInputError, match=r"bad\.txt' is not valid UTF-8: byte 10 \(0xff\)"):
        read_document_file(bad)
    with pytest.raises(AgentInputError, match=r"missing\.txt' does not exist"):
        read_document_file(tmp_path / "missing.txt")
    with pytest.raises(AgentInputError, match=r"2 questions but 1 documents"):
        agent.run(["a?", "b?"], [good])
    with pytest.raises(AgentInputError, match=r"max_position_embeddings \(512\)"):
        make_agent(setup, budgets=AgentBudgets(question_tokens=64, chunk_tokens=400, memory_tokens=32, answer_tokens=8))


def test_centre_truncation():
    from memagent_jax.agent.chunking import centre_truncate

    ids = np.arange(10)
    np.testing.assert_array_equal(centre_truncate(ids, 4), [0, 1, 8, 9])
    np.testing.assert_array_equal(centre_truncate(ids, 5), [0, 1, 7, 8, 9])
    np.testing.assert_array_equal(centre_truncate(ids, 0), ids)


def test_predictions_are_the_verifier_extraction_of_the_answers(setup, monkeypatch):
    """`AgentResult.predictions` = `readable_answer(answers[i], agent.extract)`, on every scheduling and in the
    per-row results of `on_row`; `answers` stay the raw responses."""
    from memagent_jax.evaluation.verifier import readable_answer

    docs = docs_of_lengths(setup["tokenizer"])
    agent = make_agent(setup)
    assert agent.extract == "boxed"
    plain = agent.run(QUESTIONS, docs, rng=1)
    assert plain.predictions == [readable_answer(a, "boxed") for a in plain.answers]
    raw = make_agent(setup, extract="raw").run(QUESTIONS, docs, rng=1)
    assert raw.answers == plain.answers and raw.predictions == [readable_answer(a, "raw") for a in plain.answers]
    assert all(plain.answers)  # the tiny model writes text (here white space, which the shown answer drops)
    # Responses holding boxed answers (the decoding replaced): lockstep, bucketed and continuous rows, and on_row.
    texts = MemoryAgent._answer_texts
    monkeypatch.setattr(
        MemoryAgent,
        "_answer_texts",
        lambda self, ids: [f"<think>\\boxed{{no}}</think> \\boxed{{{t}!}}" for t in texts(self, ids)],
    )
    for batch_size, scheduling in ((None, "lockstep"), (2, "bucketed"), (2, "continuous")):
        rows = {}
        result = agent.run(
            QUESTIONS,
            docs,
            rng=1,
            batch_size=batch_size,
            scheduling=scheduling,
            on_row=lambda i, r: rows.update({i: r}),
        )
        assert result.predictions == [f"{a}!".strip() for a in plain.answers], scheduling
        assert result.answers == [f"<think>\\boxed{{no}}</think> \\boxed{{{a}!}}" for a in plain.answers]
        assert [rows[i].predictions for i in range(len(docs))] == [[p] for p in result.predictions], scheduling


def test_extraction_step_on_hand_written_responses(setup):
    from memagent_jax import settings as settings_lib

    responses = [
        "The word is \\boxed{Ra}.",
        "\\boxed{a} then \\boxed{\\frac{1}{2}}",
        "<think>\\boxed{x}</think> so \\boxed{y}",
        "no box here; the answer is Mi",
        "truncated \\boxed{Ra",
    ]
    assert make_agent(setup).predict(responses) == ["Ra", "\\frac{1}{2}", "y", None, None]
    assert make_agent(setup, extract="answer_phrase").predict(responses)[3] == "Mi"
    assert make_agent(setup, extract="boxed_or_raw").predict(responses)[3:] == [responses[3], responses[4]]
    with pytest.raises(settings_lib.SettingError, match=r"^extract must be one of \['boxed'"):
        make_agent(setup, extract="last_box")


def test_a_chunk_step_no_row_reaches_runs_nothing(setup):
    """A segment's steps past every row's last chunk (documents shorter than the segment) skip the prefill and the
    decode: the cache comes back as the step's rewind left it, the memory unchanged, the record empty. One row with
    a chunk runs the step (its prefill writes the cache) and leaves the other row's memory alone."""
    agent = make_agent(setup, compact_rows=False)
    spec, b = agent.spec, 2
    rng = np.random.default_rng(0)
    cache = init_cache(spec.config, b, spec.update_cache_slots)
    cache = dataclasses.replace(
        cache,
        k=jnp.asarray(rng.normal(size=cache.k.shape), cache.k.dtype),
        v=jnp.asarray(rng.normal(size=cache.v.shape), cache.v.dtype),
        valid=jnp.ones_like(cache.valid),
        length=jnp.int32(spec.update_cache_slots),
    )
    memory = jnp.asarray(rng.integers(3, 300, (b, BUDGETS.memory_tokens)), jnp.int32)
    memory_len = jnp.asarray([5, 7], jnp.int32)
    chunk = jnp.asarray(rng.integers(3, 300, (b, BUDGETS.chunk_tokens)), jnp.int32)
    keys = jax.random.split(jax.random.key(0), b)
    step = jax.jit(program.memory_step, static_argnums=1)

    out_cache, out_memory, out_len, record = step(
        setup["params"], spec, cache, jnp.full((b,), 30, jnp.int32), memory, memory_len, chunk,
        jnp.zeros((b,), jnp.int32), keys,
    )  # fmt: skip
    np.testing.assert_array_equal(out_cache.k, cache.k)
    np.testing.assert_array_equal(out_cache.v, cache.v)
    assert int(out_cache.length) == spec.prefix_length
    assert not np.asarray(out_cache.valid)[:, spec.prefix_length :].any()
    np.testing.assert_array_equal(out_memory, memory)
    np.testing.assert_array_equal(out_len, memory_len)
    _, _, tokens, num_tokens, logprobs, active, _ = record
    assert (np.asarray(tokens) == spec.memory_sampling.pad_id).all() and not np.asarray(num_tokens).any()
    assert not np.asarray(logprobs).any() and not np.asarray(active).any()

    out_cache, out_memory, out_len, record = step(
        setup["params"], spec, cache, jnp.full((b,), 30, jnp.int32), memory, memory_len, chunk,
        jnp.asarray([BUDGETS.chunk_tokens, 0], jnp.int32), keys,
    )  # fmt: skip
    assert not np.array_equal(out_cache.k, cache.k)
    assert int(np.asarray(record[3])[0]) > 0 and int(np.asarray(record[3])[1]) == 0
    np.testing.assert_array_equal(out_memory[1], memory[1])
    assert int(out_len[1]) == 7


def test_a_chunk_step_some_rows_reach_runs_them_alone(setup):
    """With row compaction, a step that 1 or 2 of 4 rows reach runs them as a batch of 1 or 2 (the cache comes
    back as the rewind left it, so the big batch never ran); 3 of 4 run the whole batch. Every row's memory and
    log-probs are those of the step without compaction, rows without a chunk keep theirs."""
    agent = make_agent(setup)
    assert agent.spec.compact_rows and program.row_buckets(4) == (1, 2, 4) and program.row_buckets(256)[0] == 32
    spec, b = agent.spec, 4
    plain = dataclasses.replace(spec, compact_rows=False)
    rng = np.random.default_rng(1)
    memory = jnp.asarray(rng.integers(3, 300, (b, BUDGETS.memory_tokens)), jnp.int32)
    memory_len = jnp.asarray([5, 7, 3, 12], jnp.int32)
    chunk = jnp.asarray(rng.integers(3, 300, (b, BUDGETS.chunk_tokens)), jnp.int32)
    keys = jax.random.split(jax.random.key(0), b)
    question = jnp.asarray(rng.integers(3, 300, (b, BUDGETS.question_tokens)), jnp.int32)
    prefix = program.prefix_program(
        setup["params"], spec, question, jnp.asarray([24, 10, 17, 3], jnp.int32),
        init_cache(spec.config, b, spec.update_cache_slots),
    )  # fmt: skip
    step = jax.jit(program.memory_step, static_argnums=1)
    for reached, gathered in (([1, 0, 1, 0], True), ([0, 0, 0, 1], True), ([1, 1, 1, 0], False)):
        lens = jnp.asarray(reached, jnp.int32) * jnp.asarray([16, 9, 12, 16], jnp.int32)
        outs = [
            step(setup["params"], s, prefix.cache, prefix.next_positions, memory, memory_len, chunk, lens, keys)
            for s in (spec, plain)
        ]
        (cache, new_memory, new_len, record), (_, plain_memory, plain_len, plain_record) = outs
        wrote = not np.array_equal(np.asarray(cache.k), np.asarray(prefix.cache.k))
        assert wrote != gathered, reached
        np.testing.assert_array_equal(new_memory, plain_memory)
        np.testing.assert_array_equal(new_len, plain_len)
        for got, want in zip(record, plain_record):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, err_msg=str(reached))
        idle = np.asarray(reached) == 0
        np.testing.assert_array_equal(np.asarray(new_memory)[idle], np.asarray(memory)[idle])
        assert (np.asarray(record[3])[~idle] > 0).all() and not np.asarray(record[3])[idle].any()


def test_compaction_turns_on_only_for_segments_with_partly_reached_steps(setup):
    spec = make_agent(setup).spec
    assert spec.for_chunk_lens(np.asarray([[16, 16], [16, 16]])).compact_rows is False
    assert spec.for_chunk_lens(np.asarray([[16, 0], [16, 0]])).compact_rows is False  # the skip covers it
    assert spec.for_chunk_lens(np.asarray([[16, 16], [16, 0]])) is spec
    off = make_agent(setup, compact_rows=False).spec
    assert off.for_chunk_lens(np.asarray([[16, 16], [16, 0]])).compact_rows is False
