"""Sampler: parity with transformers' greedy generate, log-probs against a teacher-forced forward, the sampling
distribution against a NumPy reference, batch independence, stop tokens, compile reuse, meshes, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
import transformers

from hf_tiny import make_hf_model, save_hf_model
from memagent_jax.models import forward, init_cache, init_params, load_hf_params, positions_from_mask, rewind_cache
from memagent_jax.models import sharding as sharding_lib
from memagent_jax.models.presets import preset_config
from memagent_jax.sampling import (
    Sampler,
    SamplingError,
    SamplingParams,
    decode,
    generate,
    generate_program,
    prefill,
    row_keys,
    sample_tokens,
)

TOL = 1e-4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """variant -> (hf_model, params, config)."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for i, variant in enumerate(["qwen2", "llama3", "qwen3"]):
        model = make_hf_model(variant, seed=10 + i)
        folder = save_hf_model(model, str(root / variant))
        params, config = load_hf_params(folder)
        out[variant] = (model, params, config, folder)
    return out


def make_prompts(seed, lengths, vocab=128):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, size=n).tolist() for n in lengths]


def hf_greedy(model, prompt, n, eos):
    cfg = transformers.GenerationConfig(
        do_sample=False,
        max_new_tokens=n,
        min_new_tokens=0,
        min_length=0,
        eos_token_id=eos,
        pad_token_id=0,
        bos_token_id=1,
    )
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), generation_config=cfg)
    return out[0, len(prompt) :].tolist()


def hf_log_softmax(model, ids):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, -1).numpy(), logits.numpy()


def np_sampling_probs(logits, temperature, top_k, top_p):
    """Independent reference: the distribution after temperature -> top-k -> top-p (renormalised), float64.

    Ties are ordered by token id, lower first (the documented rule)."""
    z = np.asarray(logits, np.float64) / temperature
    order = sorted(range(len(z)), key=lambda i: (-z[i], i))
    keep = np.zeros(len(z), bool)
    kept = order[:top_k] if 0 < top_k < len(z) else order
    p = np.exp(z[kept] - z[kept].max())
    p /= p.sum()
    mass = 0.0
    for rank, tok in enumerate(kept):
        if rank > 0 and top_p < 1.0 and mass >= top_p:
            break
        keep[tok] = True
        mass += p[rank]
    out = np.where(keep, np.exp(z - z[keep].max()), 0.0)
    return out / out.sum()


# ------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("variant", ["qwen2", "llama3", "qwen3"])
def test_greedy_matches_transformers(tiny, variant):
    model, params, config, _ = tiny[variant]
    n = 12
    prompts = make_prompts(1, [7, 3, 13, 1])
    # An EOS that greedy decoding really produces: row 0's token at step 2 (first occurrence wins).
    free = hf_greedy(model, prompts[0], n, eos=None)
    eos = free[2]
    refs = [hf_greedy(model, p, n, eos=eos) for p in prompts]
    sampler = Sampler(params, config)
    res = sampler.generate(prompts, SamplingParams(max_new_tokens=n, temperature=0.0, stop_token_ids=(eos,)))
    for row, ref in enumerate(refs):
        assert res.tokens[row] == ref, (variant, row)
        assert res.num_tokens[row] == len(ref)
        assert res.finished[row] == (ref[-1] == eos)
        assert (res.token_array[row, len(ref) :] == 0).all()
    assert res.finished.any() and not res.finished.all()  # both kinds of rows in the batch
    # Without any stop id every row runs to max_new_tokens and continues past the EOS.
    res = sampler.generate(prompts, SamplingParams(max_new_tokens=n, temperature=0.0))
    assert res.tokens[0] == free and not res.finished.any() and (res.num_tokens == n).all()


def test_logprobs_match_teacher_forced_forward(tiny):
    model, params, config, _ = tiny["qwen2"]
    prompts = make_prompts(2, [5, 11, 2])
    settings = [
        SamplingParams(max_new_tokens=10, temperature=0.7, top_k=20, top_p=0.9),
        SamplingParams(max_new_tokens=10, temperature=1.0),
        SamplingParams(max_new_tokens=10, temperature=0.0),
    ]
    for sp in settings:
        res = Sampler(params, config).generate(prompts, sp, rng=3)
        for row, prompt in enumerate(prompts):
            new = res.tokens[row]
            lsm, logits = hf_log_softmax(model, prompt + new)
            at = np.arange(len(prompt) - 1, len(prompt) - 1 + len(new))
            ref = lsm[at, new]
            assert np.abs(res.row_logprobs(row) - ref).max() <= TOL, sp
            if sp.greedy:
                assert (res.sampling_logprobs[row] == 0).all()
                continue
            ref_s = [
                np.log(np_sampling_probs(logits[i], sp.temperature, sp.top_k, sp.top_p)[t]) for i, t in zip(at, new)
            ]
            assert np.abs(res.sampling_logprobs[row, : len(new)] - ref_s).max() <= TOL, sp
            if sp.top_k or sp.top_p < 1:  # truncation makes the sampled token more likely than under the model
                assert (res.sampling_logprobs[row, : len(new)] >= res.row_logprobs(row) - TOL).all()


# ------------------------------------------------------------------------ sampling distribution


@pytest.fixture(scope="module")
def tiny_vocab():
    """A 16-token model whose next-token distribution is far from uniform (LM head scaled up)."""
    config = preset_config(
        "tiny",
        vocab_size=16,
        num_layers=1,
        hidden_size=32,
        intermediate_size=64,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    params = init_params(config, 5)
    params["lm_head"] = params["lm_head"] * 8.0  # logits spread over ~3.4 units: top token ~0.26
    prompt = [3, 9, 4, 1]
    mask = jnp.ones((1, 4), bool)
    logits = forward(params, jnp.asarray([prompt]), positions_from_mask(mask), mask, config=config)[0][0, -1]
    return params, config, prompt, np.asarray(logits, np.float64)


@pytest.mark.parametrize(
    "temperature,top_k,top_p", [(1.0, 0, 1.0), (0.6, 5, 1.0), (1.5, 0, 0.7), (1.0, 6, 0.6), (2.0, 3, 0.9)]
)
def test_sampling_frequencies_match_softmax(tiny_vocab, temperature, top_k, top_p):
    params, config, prompt, logits = tiny_vocab
    assert logits.max() - logits.min() > 3.0
    expected = np_sampling_probs(logits, temperature, top_k, top_p)
    if top_p < 1:  # no cumulative sum sits on the top_p boundary (the reference would be ambiguous)
        ranked = np.sort(np_sampling_probs(logits, temperature, top_k, 1.0))[::-1]
        assert np.abs(np.cumsum(ranked) - top_p).min() > 1e-3
    n = 6000
    sp = SamplingParams(max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p)
    res = Sampler(params, config).generate([prompt] * n, sp, rng=jax.random.key(123))
    counts = np.bincount(res.token_array[:, 0], minlength=16)
    assert counts[expected == 0].sum() == 0  # filtered tokens never appear
    kept = expected > 0
    assert kept.sum() >= 2
    chi2 = scipy.stats.chisquare(counts[kept], expected[kept] * n)
    assert chi2.pvalue > 1e-3, (counts, np.round(expected * n))
    # Each row's sampling log-prob is the reference's log-probability of its token.
    np.testing.assert_allclose(res.sampling_logprobs[:, 0], np.log(expected[res.token_array[:, 0]]), atol=TOL)


def test_ties_and_greedy_rules():
    logits = jnp.asarray([[1.0, 3.0, 3.0, 3.0, -2.0, 0.5]] * 512)
    keys = row_keys(0, 512)
    toks, _, slp = sample_tokens(logits, keys, SamplingParams(temperature=1.0, top_k=2))
    assert set(np.asarray(toks).tolist()) == {1, 2}  # top_k=2 among a 3-way tie: lower ids win
    np.testing.assert_allclose(slp, np.log(0.5), atol=1e-6)
    toks, _, _ = sample_tokens(logits, keys, SamplingParams(temperature=1.0, top_p=0.3))
    assert set(np.asarray(toks).tolist()) == {1}  # nucleus smaller than one token keeps the most likely only
    toks, lp, slp = sample_tokens(logits, keys, SamplingParams(temperature=0.0))
    assert (np.asarray(toks) == 1).all() and (np.asarray(slp) == 0).all()
    np.testing.assert_allclose(lp, jax.nn.log_softmax(logits)[:, 1], atol=1e-6)
    # top_k >= vocab is no filter; temperature 1 with no filters samples from the model distribution itself.
    _, lp, slp = sample_tokens(logits, keys, SamplingParams(temperature=1.0, top_k=100))
    np.testing.assert_allclose(lp, slp, atol=1e-6)


# ------------------------------------------------------------------------- nucleus without a sort


def _mixed_logits(vocab=512, batch=96):
    """Rows 3i: peaked (a nucleus of a few tokens at top-p 0.9); 3i + 1: spread (tens); 3i + 2: nearly flat
    (hundreds)."""
    rng = np.random.default_rng(11)
    logits = rng.normal(size=(batch, vocab))
    logits[0::3] *= 6.0
    logits[1::3] *= 2.5
    logits[2::3] *= 0.2
    return jnp.asarray(logits, jnp.float32)


def test_nucleus_probes_draw_what_the_full_sort_draws():
    from memagent_jax.sampling.sampler import NUCLEUS_PROBES, _filtered_pick, _row_noise

    logits = _mixed_logits()
    b, vocab = logits.shape
    keys = row_keys(4, b)
    probs = np.asarray(jax.nn.softmax(logits, axis=-1), np.float64)
    nucleus = np.asarray([int(np.searchsorted(np.cumsum(np.sort(p)[::-1]), 0.9)) + 1 for p in probs])
    small, large = NUCLEUS_PROBES[:2]
    # Every path is taken: the first probe, the second, the full sort.
    assert nucleus[0::3].max() < small < nucleus[1::3].min() and nucleus[1::3].max() < large < nucleus[2::3].min()

    def run(probes):
        def f(s, k):
            n = s.shape[0]
            top_k, top_p, on = jnp.zeros((n,), jnp.int32), jnp.full((n,), 0.9), jnp.ones((n,), bool)
            return _filtered_pick(s, _row_noise(k, vocab, s.dtype), top_k, top_p, on, probes=probes)

        return jax.jit(f)

    probed, full = run(NUCLEUS_PROBES), run(())
    mixed_tokens, mixed_lp = probed(logits, keys)
    sorted_tokens, sorted_lp = full(logits, keys)
    np.testing.assert_array_equal(mixed_tokens, sorted_tokens)
    np.testing.assert_allclose(mixed_lp, sorted_lp, atol=1e-5)
    # Rows alone or beside other kinds of rows (other paths taken): the same draws.
    for rows in (slice(0, None, 3), slice(1, None, 3), slice(0, 48)):
        alone_tokens, alone_lp = probed(logits[rows], keys[rows])
        np.testing.assert_array_equal(alone_tokens, mixed_tokens[rows])
        np.testing.assert_allclose(alone_lp, mixed_lp[rows], atol=1e-6)
    # Every draw lies in its row's nucleus (float64 reference), and its log-prob is the renormalised nucleus's.
    for row, token in enumerate(np.asarray(mixed_tokens)):
        expected = np_sampling_probs(np.asarray(logits[row], np.float64), 1.0, 0, 0.9)
        assert expected[token] > 0, row
        np.testing.assert_allclose(mixed_lp[row], np.log(expected[token]), atol=TOL)


def test_nucleus_probe_frequencies_match_reference():
    logits = np.random.default_rng(13).normal(size=512) * 3.0  # a nucleus of 5 tokens at top-p 0.9: the probe
    temperature, top_p = 1.0, 0.9
    expected = np_sampling_probs(logits, temperature, 0, top_p)
    ranked = np.sort(np_sampling_probs(logits, temperature, 0, 1.0))[::-1]
    assert np.abs(np.cumsum(ranked) - top_p).min() > 2e-3 and (expected > 0).sum() == 5
    n = 6000
    toks, _, slp = jax.jit(sample_tokens, static_argnums=2)(
        jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, logits.size)),
        row_keys(9, n),
        SamplingParams(temperature=temperature, top_p=top_p),
    )
    counts = np.bincount(np.asarray(toks), minlength=logits.size)
    assert counts[expected == 0].sum() == 0
    kept = expected > 0
    assert scipy.stats.chisquare(counts[kept], expected[kept] * n).pvalue > 1e-3
    np.testing.assert_allclose(slp, np.log(expected[np.asarray(toks)]), atol=TOL)


# --------------------------------------------------------------------------- batch independence


def test_row_output_independent_of_batch_mates(tiny):
    _, params, config, _ = tiny["qwen2"]
    prompts = make_prompts(4, [9, 4, 15, 6])
    keys = jax.random.split(jax.random.key(7), 4)
    sampler = Sampler(params, config)
    sp = SamplingParams(max_new_tokens=16, temperature=0.8, top_p=0.95, top_k=60)
    batch = sampler.generate(prompts, sp, rng=keys)
    for row in (1, 2):  # alone: other padding, batch size 1
        alone = sampler.generate([prompts[row]], sp, rng=keys[row : row + 1])
        assert alone.tokens[0] == batch.tokens[row]
        np.testing.assert_allclose(alone.row_logprobs(0), batch.row_logprobs(row), atol=1e-5)
    # Same prompt, same key, other mates: still the same output. Different keys: different outputs.
    other = sampler.generate([prompts[1], prompts[3]], sp, rng=jnp.stack([keys[1], keys[0]]))
    assert other.tokens[0] == batch.tokens[1]
    assert other.tokens[1] != batch.tokens[3]


# ------------------------------------------------------------------------------- stop and pads


def test_extra_stop_ids_and_pads(tiny):
    _, params, config, _ = tiny["qwen2"]
    prompts = make_prompts(5, [6, 10])
    sampler = Sampler(params, config)
    base = sampler.generate(prompts, SamplingParams(max_new_tokens=12, temperature=0.9), rng=1)
    stop_a = base.tokens[1][4]
    first = base.tokens[1].index(stop_a)
    sp = SamplingParams(max_new_tokens=12, temperature=0.9, stop_token_ids=(127, stop_a), pad_id=5)
    res = sampler.generate(prompts, sp, rng=1)
    assert res.tokens[1] == base.tokens[1][: first + 1] and res.finished[1]
    assert (res.token_array[1, first + 1 :] == 5).all()
    assert (res.logprobs[1, first + 1 :] == 0).all() and (res.sampling_logprobs[1, first + 1 :] == 0).all()
    np.testing.assert_allclose(res.row_logprobs(1), base.logprobs[1, : first + 1], atol=1e-6)
    row0_stop = [i for i, t in enumerate(base.tokens[0]) if t in (127, stop_a)]
    expect0 = base.tokens[0][: row0_stop[0] + 1] if row0_stop else base.tokens[0]
    assert res.tokens[0] == expect0 and res.finished[0] == bool(row0_stop)


def test_inactive_rows_produce_nothing_and_loop_exits_early(tiny):
    _, params, config, _ = tiny["qwen2"]
    prompts = make_prompts(6, [5, 5, 5])
    tokens = jnp.asarray(prompts, jnp.int32)
    mask = jnp.ones_like(tokens, bool)
    eos = Sampler(params, config).generate(prompts[:1], SamplingParams(max_new_tokens=3, temperature=0.0)).tokens[0][0]

    @jax.jit
    def run(active):
        cache = init_cache(config, 3, 5 + 64)
        pre = prefill(params, config, tokens, mask, cache)
        sp = SamplingParams(max_new_tokens=64, temperature=0.0, stop_token_ids=(eos,), pad_id=7)
        return decode(params, config, pre.cache, pre.last_logits, pre.next_positions, row_keys(0, 3), sp, active)

    out = run(jnp.asarray([True, False, False]))
    assert int(out.num_tokens[0]) == 1 and bool(out.finished[0]) and int(out.tokens[0, 0]) == eos
    assert (np.asarray(out.num_tokens[1:]) == 0).all() and not np.asarray(out.finished[1:]).any()
    assert (np.asarray(out.tokens[1:]) == 7).all() and (np.asarray(out.logprobs[1:]) == 0).all()
    # Row 0 stopped at the first token and the others were inactive: no decode forward ran.
    assert int(out.cache.length) == 5
    out = run(jnp.asarray([False, False, False]))
    assert int(out.cache.length) == 5 and (np.asarray(out.num_tokens) == 0).all()


# -------------------------------------------------------------------- compiles, cache donation


def test_no_recompile_for_new_batch_of_same_bucket(tiny):
    _, params, config, _ = tiny["llama3"]
    sampler = Sampler(params, config, min_bucket=16)
    sp = SamplingParams(max_new_tokens=5, temperature=1.0)
    sampler.generate(make_prompts(7, [3, 9, 12]), sp, rng=0)
    cache_before = sampler._caches[(16, 3, 21)]
    before = generate_program._cache_size()
    res = sampler.generate(make_prompts(8, [16, 1, 5]), sp, rng=1)  # other prompts, lengths, key: same bucket
    assert generate_program._cache_size() == before
    assert res.bucket == 16
    assert cache_before.k.is_deleted()  # the kept cache was donated to the second call
    sampler.generate(make_prompts(9, [17]), sp, rng=1)  # next bucket: one more program
    assert generate_program._cache_size() == before + 1
    # A one-shot generate with the same shapes reuses the same program too.
    generate(params, config, make_prompts(10, [2, 2, 2]), sp, rng=2)
    assert generate_program._cache_size() == before + 1


# -------------------------------------------------------------------------------------- mesh


def test_sharded_params_and_batch_match_single_device(tiny):
    _, params, config, folder = tiny["qwen3"]
    mesh = sharding_lib.make_mesh(data=2, fsdp=2, tensor=2)
    sharded, _ = load_hf_params(folder, mesh=mesh)
    assert len(sharded["layers"]["mlp"]["up_proj"].sharding.device_set) == 8
    prompts = make_prompts(11, [4, 9, 2])  # 3 rows: padded to 4 for the 2 x 2 batch axes
    sp = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.9)
    ref = Sampler(params, config).generate(prompts, sp, rng=4)
    got, raw = Sampler(sharded, config, mesh=mesh).generate(prompts, sp, rng=4, return_cache=True)
    assert len(raw.cache.k.sharding.device_set) == 8 and raw.cache.k.sharding.spec[1] == ("data", "fsdp")
    assert got.tokens == ref.tokens
    np.testing.assert_allclose(got.logprobs, ref.logprobs, atol=1e-5)
    np.testing.assert_allclose(got.sampling_logprobs, ref.sampling_logprobs, atol=1e-5)


# ------------------------------------------------------------------ composing inside a user jit


def test_prefix_reuse_inside_scan_matches_generate(tiny):
    """The agent's pattern: prefill a shared prefix once, then per step rewind, prefill the rest, decode."""
    _, params, config, _ = tiny["qwen2"]
    prefix = make_prompts(12, [6, 3])
    chunks = [make_prompts(13, [4, 7]), make_prompts(14, [5, 2])]  # step k: row r continues prefix[r]
    b, p_len, c_len, n = 2, 8, 8, 6
    sp = SamplingParams(max_new_tokens=n, temperature=0.9, top_k=40)

    def left_pad(rows, width):
        toks = np.zeros((len(rows), width), np.int32)
        mask = np.zeros((len(rows), width), bool)
        for i, r in enumerate(rows):
            toks[i, width - len(r) :], mask[i, width - len(r) :] = r, True
        return jnp.asarray(toks), jnp.asarray(mask)

    pt, pm = left_pad(prefix, p_len)
    ct = jnp.stack([left_pad(c, c_len)[0] for c in chunks])
    cm = jnp.stack([left_pad(c, c_len)[1] for c in chunks])
    keys = jax.random.split(jax.random.key(3), 2 * b).reshape(2, b)

    @jax.jit
    def agent(pt, pm, ct, cm, keys):
        cache = init_cache(config, b, p_len + c_len + n)
        head = prefill(params, config, pt, pm, cache)

        def step(carry, xs):
            tokens, mask, step_keys = xs
            cache = rewind_cache(carry, p_len)
            pre = prefill(params, config, tokens, mask, cache, start_positions=head.next_positions)
            out = decode(params, config, pre.cache, pre.last_logits, pre.next_positions, step_keys, sp)
            return out.cache, (out.tokens, out.num_tokens, out.logprobs)

        return jax.lax.scan(step, head.cache, (ct, cm, keys))[1]

    tokens, counts, logprobs = agent(pt, pm, ct, cm, keys)
    sampler = Sampler(params, config)
    for k in range(2):
        ref = sampler.generate([prefix[r] + chunks[k][r] for r in range(b)], sp, rng=keys[k])
        for r in range(b):
            assert np.asarray(tokens[k, r, : counts[k, r]]).tolist() == ref.tokens[r]
            np.testing.assert_allclose(logprobs[k, r, : counts[k, r]], ref.row_logprobs(r), atol=1e-5)


# ---------------------------------------------------------------------------------- bad input


def test_bad_sampling_params():
    for kwargs, name in [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=-3), "max_new_tokens"),
        (dict(max_new_tokens=2.5), "max_new_tokens"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_p=-0.1), "top_p"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_k=-1), "top_k"),
        (dict(stop_token_ids=(-2,)), "stop_token_ids"),
        (dict(pad_id=-1), "pad_id"),
    ]:
        with pytest.raises(SamplingError, match=name):
            SamplingParams(**kwargs)
    assert SamplingParams(stop_token_ids=[5, 2, 5]) == SamplingParams(stop_token_ids=(2, 5))
    assert hash(SamplingParams(stop_token_ids=[5, 2])) == hash(SamplingParams(stop_token_ids=(2, 5)))
    assert SamplingParams(stop_token_ids=7).stop_token_ids == (7,)


@pytest.mark.parametrize(
    "call, match",
    [
        pytest.param(lambda g, sp: g([[4, 5], []], sp), r"prompts\[1\] is empty", id="empty-prompt"),
        pytest.param(lambda g, sp: g([], sp), "prompts is empty", id="no-prompts"),
        pytest.param(lambda g, sp: g([[4] * 33], sp), "longer than the largest bucket", id="prompt-too-long"),
        pytest.param(lambda g, sp: g([[4, 128]], sp), r"prompts\[0\] holds token id 128", id="token-out-of-vocab"),
        pytest.param(lambda g, sp: g(["hello"], sp), "tokenize it first", id="text-prompt"),
        pytest.param(
            lambda g, sp: g([[4]], SamplingParams(stop_token_ids=(500,))), "stop_token_ids", id="stop-id-out-of-vocab"
        ),
        pytest.param(
            lambda g, sp: g([[4], [5]], sp, rng=jax.random.split(jax.random.key(0), 3)),
            "3 keys, but there are 2 prompts",
            id="key-count",
        ),
        pytest.param(lambda g, sp: g([[4]], {"max_new_tokens": 4}), "SamplingParams", id="params-not-samplingparams"),
    ],
)
def test_bad_prompts(tiny, call, match):
    _, params, config, _ = tiny["qwen2"]
    sampler = Sampler(params, config, max_prompt_length=32)
    with pytest.raises(SamplingError, match=match):
        call(sampler.generate, SamplingParams(max_new_tokens=4))


def test_first_argmax_equals_argmax_ties_nan_and_infinities():
    """The decode loop's argmax (a max, then the smallest index holding it) picks what `jnp.argmax` picks: the first
    maximum, the first NaN of a row that has one, index 0 of a row of -inf."""
    from memagent_jax.sampling.sampler import first_argmax

    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 1024)).astype(np.float32)
    x[1, [5, 700]] = 50.0  # a tie: the first wins
    x[2, 33] = np.nan
    x[2, 900] = np.nan
    x[3] = -np.inf
    x[4, [0, 1023]] = np.inf
    x[5] = np.round(x[5])  # many ties
    got = np.asarray(jax.jit(first_argmax)(jnp.asarray(x)))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, np.asarray(jnp.argmax(jnp.asarray(x), axis=-1)))
    assert list(got[1:5]) == [5, 33, 0, 0]
