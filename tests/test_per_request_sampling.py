"""Per-request sampling: temperature / top-k / top-p as per-row arrays of one compiled program, per-row seeds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from hf_tiny import make_agent_model_dir
from memagent_jax.agent import AgentBudgets, MemoryAgent
from memagent_jax.data.tokenizer import load_tokenizer
from memagent_jax.models import init_params, load_hf_params
from memagent_jax.models.presets import preset_config
from memagent_jax.sampling import RowSampling, Sampler, SamplingError, SamplingParams, generate_program, row_keys
from memagent_jax.sampling.sampler import sample_tokens

TOL = 1e-4


def reference_probs(logits, temperature, top_k, top_p):
    """Plain NumPy, float64: the distribution a row samples from (temperature 0: a point mass on the argmax)."""
    logits = np.asarray(logits, np.float64)
    v = logits.size
    order = sorted(range(v), key=lambda i: (-logits[i], i))  # descending, ties: lower id first
    if temperature == 0:
        out = np.zeros(v)
        out[order[0]] = 1.0
        return out
    kept = order[:top_k] if 0 < top_k < v else order
    z = logits[kept] / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        ahead, n = 0.0, 0
        for q in p:
            if n > 0 and ahead >= top_p:
                break
            ahead += q
            n += 1
        kept, p = kept[:n], p[:n] / p[:n].sum()
    out = np.zeros(v)
    out[kept] = p
    return out


ROW_SETTINGS = [  # (temperature, top_k, top_p)
    (0.0, 0, 1.0),
    (1.0, 2, 1.0),
    (0.7, 0, 0.6),
    (1.5, 4, 0.8),
    (1.0, 0, 1.0),
    (0.0, 3, 0.5),
    (2.0, 100, 1.0),
    (0.5, 1, 1.0),
]


def test_per_row_filters_match_numpy_reference_with_ties():
    rng = np.random.default_rng(3)
    base = rng.normal(size=(len(ROW_SETTINGS), 12)) * 2.0
    base[:, [1, 2, 3]] = base.max(axis=1, keepdims=True) + 1.0  # a 3-way tie at the top of every row
    logits = jnp.asarray(base, jnp.float32)
    rows = RowSampling.build([SamplingParams(temperature=t, top_k=k, top_p=p) for t, k, p in ROW_SETTINGS], None)
    run = jax.jit(sample_tokens)
    seen = [set() for _ in ROW_SETTINGS]
    for seed in range(40):
        tokens, lp, slp = run(logits, row_keys(seed, len(ROW_SETTINGS)), rows)
        for r, (t, k, p) in enumerate(ROW_SETTINGS):
            expected = reference_probs(base[r], t, k, p)
            token = int(tokens[r])
            assert expected[token] > 0, (r, token)
            seen[r].add(token)
            want_slp = 0.0 if t == 0 else np.log(expected[token])
            np.testing.assert_allclose(slp[r], want_slp, atol=TOL)
            np.testing.assert_allclose(lp[r], jax.nn.log_softmax(logits[r])[token], atol=1e-5)
    assert seen[0] == {1} and seen[5] == {1}  # greedy: the tie goes to the lowest id, filters unused
    assert seen[1] == {1, 2} and seen[7] == {1}  # top_k 2 / 1 among a 3-way tie: lower ids
    assert len(seen[4]) > 3  # no filter


def test_per_row_frequencies_match_reference():
    logits = np.random.default_rng(5).normal(size=10) * 1.5
    settings = [(1.0, 0, 0.7), (0.6, 5, 1.0), (1.3, 6, 0.8)]
    n = 3000
    rows = RowSampling.build([SamplingParams(temperature=t, top_k=k, top_p=p) for t, k, p in settings] * n, None)
    batch = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (3 * n, logits.size))
    tokens = np.asarray(jax.jit(sample_tokens)(batch, row_keys(1, 3 * n), rows)[0]).reshape(n, 3)
    for j, (t, k, p) in enumerate(settings):
        expected = reference_probs(logits, t, k, p)
        counts = np.bincount(tokens[:, j], minlength=logits.size)
        assert counts[expected == 0].sum() == 0
        kept = expected > 0
        assert scipy.stats.chisquare(counts[kept], expected[kept] * n).pvalue > 1e-3


@pytest.fixture(scope="module")
def tiny():
    config = preset_config("tiny", vocab_size=128, max_position_embeddings=128)
    return init_params(config, 0), config


def test_greedy_row_in_mixed_batch_equals_batch_one_greedy_and_one_compile(tiny):
    params, config = tiny
    sampler = Sampler(params, config, min_bucket=16)
    prompts = [[5, 9, 3, 7], [8, 1, 4], [2, 6, 6, 9, 1], [11, 12]]
    sp = SamplingParams(max_new_tokens=8, temperature=0.0)
    alone = sampler.generate(prompts[:1], sp, rng=3)
    before = generate_program._cache_size()
    mixed = [
        None,
        sp.replace(temperature=1.2, top_k=7),
        sp.replace(temperature=0.8, top_p=0.9),
        sp.replace(temperature=1.0),
    ]
    batch = sampler.generate(prompts, sp, rng=4, per_row=mixed)
    assert batch.tokens[0] == alone.tokens[0]
    np.testing.assert_allclose(batch.row_logprobs(0), alone.row_logprobs(0), atol=1e-5)
    # Other settings, other default temperature: the same program (the batch of 4 compiled one for its shape).
    compiled = generate_program._cache_size()
    assert compiled <= before + 1
    sampler.generate(prompts, sp.replace(temperature=0.3, top_p=0.5), rng=5, per_row=[None, sp, None, sp])
    sampler.generate(prompts, sp.replace(temperature=1.7, top_k=3), rng=6)
    assert generate_program._cache_size() == compiled


def test_same_seed_same_sample_whatever_companions(tiny):
    params, config = tiny
    sampler = Sampler(params, config, min_bucket=16)
    sp = SamplingParams(max_new_tokens=10)
    prompt = [4, 8, 15, 16]
    mine = sp.replace(temperature=0.9, top_p=0.95)
    key = jax.random.key(42)
    alone = sampler.generate([prompt], sp, rng=key[None], per_row=[mine])
    keys = jnp.stack([jax.random.key(1), key, jax.random.key(2)])
    mates = sampler.generate(
        [[1, 2, 3], prompt, [9] * 7], sp, rng=keys, per_row=[sp.replace(temperature=0.0), mine, sp.replace(top_k=3)]
    )
    assert mates.tokens[1] == alone.tokens[0]
    np.testing.assert_allclose(mates.sampling_logprobs[1], alone.sampling_logprobs[0], atol=1e-5)
    other = sampler.generate([prompt] * 4, sp, rng=jax.random.split(jax.random.key(7), 4), per_row=[mine] * 4)
    assert len({tuple(t) for t in other.tokens + alone.tokens}) > 1  # different seeds differ


def test_row_sampling_validation():
    with pytest.raises(SamplingError, match="temperature"):
        SamplingParams(temperature=-1.0)
    with pytest.raises(SamplingError, match=r"sampling\[1\]"):
        RowSampling.build([None, {"temperature": 0.5}], SamplingParams())
    rows = RowSampling.build([SamplingParams(temperature=0.5, top_k=3)], SamplingParams(), batch=3)
    assert rows.temperature.tolist() == [0.5, 0.0, 0.0] and rows.top_k.tolist() == [3, 0, 0]


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    folder = make_agent_model_dir(tmp_path_factory.mktemp("per_row") / "model", seed=5, vocab_size=400)
    params, config = load_hf_params(folder)
    budgets = AgentBudgets(question_tokens=24, chunk_tokens=16, memory_tokens=12, answer_tokens=6, chunks_per_segment=2)
    memory = SamplingParams(temperature=0.9, top_p=0.95)
    return MemoryAgent(params, config, load_tokenizer(folder), budgets=budgets, memory_sampling=memory)


@pytest.mark.parametrize("scheduling", ["lockstep", "continuous"])
def test_agent_run_per_row_sampling(agent, scheduling):
    rng = np.random.default_rng(0)
    docs = [rng.integers(3, 400, n).astype(np.int32) for n in (40, 70, 25)]
    questions = ["Where is the key?", "Which river?", "Name it."]
    greedy = agent.spec.memory_sampling.replace(temperature=0.0)
    hot = agent.spec.memory_sampling.replace(temperature=1.5, top_k=20)
    batch_size = None if scheduling == "lockstep" else 2
    keys = row_keys(9, 3)
    mixed = agent.run(
        questions,
        docs,
        rng=keys,
        sampling=[greedy, hot, None],
        batch_size=batch_size,
        scheduling=scheduling,
        trace=True,
    )
    alone = agent.run(questions[:1], docs[:1], rng=keys[:1], sampling=greedy, trace=True)
    assert mixed.answer_ids[0] == alone.answer_ids[0] and mixed.traces[0] == alone.traces[0]
    default = agent.run(questions[2:], docs[2:], rng=keys[2:], trace=True)
    assert mixed.answer_ids[2] == default.answer_ids[0] and mixed.traces[2] == default.traces[0]
    with pytest.raises(SamplingError, match="2 entries for 3 rows"):
        agent.run(questions, docs, sampling=[greedy, hot])


def test_agent_top_k_flag_reaches_the_sampler(tmp_path):
    """`--agent.top_k 1` at temperature 1 is greedy in the agent the flags build (answer, serve: `build_agent`), and
    the settings file's top_k is the default the flag overrides."""
    from hf_tiny import SMALL_ANSWER_FLAGS
    from memagent_jax import answer
    from memagent_jax.agent import AgentSettings
    from memagent_jax.model_flags import FlagError, build_agent, check_model_and_agent_flags, resolve_settings
    from memagent_jax.serve import server

    folder = make_agent_model_dir(tmp_path / "model", variant="qwen2", seed=1)
    single = ["--model", folder, "--question", "Where is the key?", "--document", "-"]
    args = answer._parser().parse_args(single + SMALL_ANSWER_FLAGS + ["--agent.temperature", "1", "--agent.top_k", "1"])
    check_model_and_agent_flags(args)
    agent = build_agent(args)
    assert agent.spec.memory_sampling.top_k == 1 and agent.spec.answer_sampling.top_k == 1
    doc = "The red key is under the third stone. The blue door is open. " * 6
    run = lambda sampling=None: agent.run(["Where is the key?"], [doc], rng=3, trace=True, sampling=sampling)  # noqa: E731
    flagged = run()
    greedy = run(agent.spec.memory_sampling.replace(temperature=0.0))
    assert flagged.answer_ids == greedy.answer_ids and flagged.traces == greedy.traces
    unfiltered = run(agent.spec.memory_sampling.replace(top_k=0))  # the filter is what made it greedy
    assert (unfiltered.answer_ids, unfiltered.traces) != (greedy.answer_ids, greedy.traces)

    serve_args = server._parser().parse_args(["--model", folder, "--agent.top_k", "7"])
    assert resolve_settings(serve_args).sampling().top_k == 7
    AgentSettings(top_k=4).save(folder)  # the settings file's top_k is the default; the flag wins
    assert resolve_settings(server._parser().parse_args(["--model", folder])).sampling().top_k == 4
    assert resolve_settings(serve_args).sampling().top_k == 7
    bad = answer._parser().parse_args(single + ["--agent.top_k", "-1"])
    with pytest.raises(FlagError, match=r"--agent\.top_k must be an integer >= 0 \(0 = off\), got -1"):
        check_model_and_agent_flags(bad)


@pytest.mark.slow
@pytest.mark.parametrize("scheduling", ["lockstep", "continuous"])
def test_rollout_logprobs_are_the_learners_at_temperature_0_7(agent, scheduling):
    """A rollout agent (`tempered_logprobs`, as the trainer builds it) records each sampled token's log-prob under
    logits / 0.7 (no top-p), and the learner at `logprob_temperature=0.7` computes the same quantity, so the first
    update's ratio is 1 (as verl). The same samples from an agent without the flag keep the model's own
    (temperature 1) log-probs, those of a temperature-1 learner."""
    from memagent_jax.rl.batch import build_conversation_batch
    from memagent_jax.rl.learner import Learner, LearnerConfig

    hot = agent.spec.memory_sampling.replace(temperature=0.7, top_p=0.9)
    rollout_agent = MemoryAgent(
        agent.params,
        agent.config,
        agent.tokenizer,
        budgets=agent.budgets,
        memory_sampling=hot.replace(tempered_logprobs=True),
    )
    rng = np.random.default_rng(1)
    docs = [rng.integers(3, 400, n).astype(np.int32) for n in (40, 25)]
    questions = ["Where is the key?", "Which river?"]
    batch_size = None if scheduling == "lockstep" else 1

    def run(which, sampling=None):
        result = which.run(
            questions, docs, rng=2, sampling=sampling, record=True, batch_size=batch_size, scheduling=scheduling
        )
        convs = [c for row in result.conversations for c in row]
        return build_conversation_batch(
            [c.prompt_ids for c in convs],
            [c.response_ids for c in convs],
            [c.logprobs for c in convs],
            [1.0] * len(convs),
            length_multiple=16,
        )

    batch = run(rollout_agent)
    mask = np.asarray(batch.loss_mask)
    assert mask.sum() > 20
    new = np.asarray(Learner(agent.config, LearnerConfig(logprob_temperature=0.7)).logprobs(agent.params, batch))
    ratio = np.exp(new - np.asarray(batch.old_logprobs))[mask]
    np.testing.assert_allclose(ratio, 1.0, atol=1e-5)
    # The temperature-1 log-probs are other numbers: a learner that ignored the temperature would not see ratio 1.
    plain = np.asarray(Learner(agent.config, LearnerConfig()).logprobs(agent.params, batch))
    assert np.abs(plain - np.asarray(batch.old_logprobs))[mask].max() > 1e-2
    # Without the flag (evaluation, answer, serve): the same samples, with the model's own log-probs.
    untempered = run(agent, hot)
    np.testing.assert_array_equal(untempered.tokens, batch.tokens)
    ratio = np.exp(plain - np.asarray(untempered.old_logprobs))[mask]
    np.testing.assert_allclose(ratio, 1.0, atol=1e-5)
