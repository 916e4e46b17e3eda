"""Tests of the RULER-style synthetic tasks (memagent_jax.data.synthetic)."""

import hashlib
import os
import random
import re
import subprocess
import sys
import time

import pytest

from memagent_jax.data import synthetic as S
from memagent_jax.data import tokenizer as T
from memagent_jax.data.synthetic import SyntheticConfig, generate_sample, registry
from memagent_jax.data.synthetic.document import derive_seed
from memagent_jax.data.synthetic.multihop_qa import RELATIONS
from memagent_jax.data.synthetic.vocabulary import sentence_units


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    folder = T.train_tokenizer(S.tokenizer_corpus(), tmp_path_factory.mktemp("tok"), vocab_size=1024)
    return T.load_tokenizer(folder)


@pytest.fixture(scope="module")
def small_tok(tmp_path_factory):
    """A tokenizer with few merges: most words are several tokens (tests additivity, not luck)."""
    folder = T.train_tokenizer(S.tokenizer_corpus(num_samples=4), tmp_path_factory.mktemp("tok_small"), vocab_size=300)
    return T.load_tokenizer(folder)


def n_tokens(tok, text):
    return len(tok.encode(text, add_special_tokens=False))


# ---------------------------------------------------------------------------------------------
# determinism
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", S.TASKS)
def test_deterministic_for_a_seed(tok, task):
    cfg = SyntheticConfig(task, num_tokens=800, seed=5)
    a, b = generate_sample(cfg, 3, tok), generate_sample(cfg, 3, tok)
    assert a.text() == b.text() and a.question == b.question and a.answers == b.answers and a.facts == b.facts
    other_seed = generate_sample(cfg.replace(seed=6), 3, tok)
    other_index = generate_sample(cfg, 4, tok)
    assert other_seed.text() != a.text() and other_index.text() != a.text()


def test_deterministic_across_processes_and_hash_seeds():
    code = (
        "import hashlib; from memagent_jax.data.synthetic import *; "
        "s = generate_sample(SyntheticConfig('multihop_qa', 3000, seed=2), 7, whitespace_counter); "
        "print(hashlib.sha256((s.question + '|' + '|'.join(s.answers) + '|' + s.text()).encode()).hexdigest())"
    )
    digests = set()
    for hash_seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True, cwd=os.getcwd()
        )
        digests.add(out.stdout.strip())
    s = generate_sample(SyntheticConfig("multihop_qa", 3000, seed=2), 7, S.whitespace_counter)
    digests.add(hashlib.sha256((s.question + "|" + "|".join(s.answers) + "|" + s.text()).encode()).hexdigest())
    assert len(digests) == 1


def test_question_and_answers_do_not_depend_on_length(tok):
    for task in S.TASKS:
        cfg = SyntheticConfig(task, num_tokens=600, seed=1)
        short, long = generate_sample(cfg, 2, tok), generate_sample(cfg.replace(num_tokens=5000), 2, tok)
        assert (short.question, short.answers) == (long.question, long.answers)


# ---------------------------------------------------------------------------------------------
# lengths
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", S.TASKS)
@pytest.mark.parametrize("num_tokens", [300, 1000, 4000])
def test_length_within_two_percent(tok, small_tok, task, num_tokens):
    for tk, target in ((tok, num_tokens), (small_tok, max(num_tokens, 600))):
        for index in range(3):
            s = generate_sample(SyntheticConfig(task, num_tokens=target, seed=index), index, tk)
            real = n_tokens(tk, s.text())
            assert abs(real - target) <= 0.02 * target, (task, target, real)
            assert real == s.num_tokens  # the plan's count is exact for these tokenizers


def test_facts_longer_than_target_rejected(tok):
    with pytest.raises(ValueError, match="facts alone"):
        generate_sample(SyntheticConfig("niah_multikey", num_tokens=30, num_distractors=10), 0, tok)


# ---------------------------------------------------------------------------------------------
# answers present where stated, absent elsewhere
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", S.TASKS)
def test_answers_only_inside_answer_facts(tok, task):
    for index in range(5):
        s = generate_sample(SyntheticConfig(task, num_tokens=1500, seed=9), index, tok)
        text = s.text().lower()
        answer_facts = [i for i, f in enumerate(s.facts) if f.role == "answer"]
        assert answer_facts
        for ans in s.answers:
            assert ans.lower() in text
            stating = [f for f in s.facts if ans.lower() in f.text.lower()]
            assert stating and all(f.role == "answer" for f in stating)
            # everything outside the answer facts: filler, support and distractors
            assert ans.lower() not in s.text(omit=answer_facts).lower()
        assert all(f.text in s.text() for f in s.facts)


def test_niah_shapes(tok):
    s = generate_sample(SyntheticConfig("niah_single", 500), 0, tok)
    assert len(s.answers) == 1 and len(s.facts) == 1 and re.fullmatch(r"\d{7}", s.answers[0])
    mk = generate_sample(SyntheticConfig("niah_multikey", 800, num_distractors=5), 0, tok)
    assert sum(f.role == "distractor" for f in mk.facts) == 5 and len(mk.answers) == 1
    keys = [f.triple[0] for f in mk.facts]
    assert len(set(keys)) == 6
    mv = generate_sample(SyntheticConfig("niah_multivalue", 800, num_values=3), 0, tok)
    assert len(mv.answers) == 3 and len({f.triple[0] for f in mv.facts}) == 1
    mq = generate_sample(SyntheticConfig("niah_multiquery", 800, num_queries=3), 0, tok)
    assert len(mq.answers) == 3 and all(f.triple[0] in mq.question for f in mq.facts)
    assert {mq.metric, mq.reward_style} == {"string_match_all", "boxed_all"}


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 1.0])
def test_needle_depth(tok, depth):
    s = generate_sample(SyntheticConfig("niah_single", 4000, depth=depth), 0, tok)
    (fact,) = s.facts
    assert abs(fact.token_offset - depth * (s.num_tokens - fact.num_tokens)) <= 25  # one sentence
    assert n_tokens(tok, s.text()[: s.text().index(fact.text)]) == fact.token_offset


def test_variable_tracking_chain(tok):
    s = generate_sample(SyntheticConfig("variable_tracking", 2000, hops=3, num_distractors=2), 1, tok)
    assert len(s.answers) == 4
    chain = [f for f in s.facts if f.role == "answer"]
    assert len(chain) == 4 and sum(f.role == "distractor" for f in s.facts) == 8
    # Statements come in assignment order, and following them from the value reaches every answer.
    value = re.search(r"value (\d+)", s.question).group(1)
    holding = {value}
    for m in re.finditer(r"Let ([A-Z]{5}) be ([A-Z]{5}|\d+)\.", s.text()):
        if m.group(2) in holding:
            holding.add(m.group(1))
    assert holding - {value} == set(s.answers)


# ---------------------------------------------------------------------------------------------
# multi-hop: the answer needs every hop fact, from different chunks
# ---------------------------------------------------------------------------------------------

_PATTERNS = [
    re.compile(
        t.replace(".", r"\.")
        .replace("{s}", r"(?P<s>[A-Z][a-z]+(?: [A-Z][a-z]+)?)")
        .replace("{o}", r"(?P<o>[A-Z][a-z]+(?: [A-Z][a-z]+)?)")
    )
    for t, _, _ in RELATIONS
]


def resolve(text: str, person: str, hops: int):
    """Follow the relations through the text from the person; None if any hop is missing."""
    entity = person
    for h in range(hops):
        found = [m.group("o") for m in _PATTERNS[h].finditer(text) if m.group("s") == entity]
        if len(found) != 1:
            return None
        entity = found[0]
    return entity


@pytest.mark.parametrize("hops", [1, 2, 3, 4])
def test_multihop_needs_every_fact(tok, hops):
    for index in range(4):
        s = generate_sample(SyntheticConfig("multihop_qa", 2500, hops=hops, num_distractors=3), index, tok)
        person = re.search(r"(?:does|that) ([A-Z][a-z]+ [A-Z][a-z]+) work", s.question).group(1)
        text = s.text()
        assert resolve(text, person, hops) == s.answers[0]
        needed = [i for i, f in enumerate(s.facts) if f.role in ("answer", "support")]
        assert len(needed) == hops
        for i in needed:  # drop any one hop fact: the answer cannot be reached
            assert resolve(s.text(omit=[i]), person, hops) is None
        # the person is only in the first hop, the answer only in the last
        assert sum(person in f.text for f in s.facts) == 1 and text.count(person) == 1
        assert text.count(s.answers[0]) == 1
        assert sum(f.role == "distractor" for f in s.facts) == 3 * hops


@pytest.mark.parametrize("task,hops", [("multihop_qa", 2), ("multihop_qa", 3), ("variable_tracking", 4)])
def test_needed_facts_in_different_chunks(tok, task, hops):
    chunk = 128
    for index in range(4):
        s = generate_sample(SyntheticConfig(task, 2000, hops=hops, chunk_tokens=chunk), index, tok)
        text = s.text()
        offsets = []
        for f in s.facts:
            measured = n_tokens(tok, text[: text.index(f.text)])
            assert measured == f.token_offset
            if f.role != "distractor":
                offsets.append(measured)
        offsets.sort()
        assert all(b - a >= chunk for a, b in zip(offsets, offsets[1:]))
        assert len({o // chunk for o in offsets}) == len(offsets)  # no chunk holds two of them


def test_chunk_gap_impossible_rejected(tok):
    with pytest.raises(ValueError, match="cannot be 500 tokens apart"):
        generate_sample(SyntheticConfig("multihop_qa", 1000, hops=3, chunk_tokens=500), 0, tok)


# ---------------------------------------------------------------------------------------------
# laziness and token streaming
# ---------------------------------------------------------------------------------------------


def test_token_chunks_match_whole_encoding(tok):
    s = generate_sample(SyntheticConfig("niah_multikey", 3000), 1, tok)
    ids = tok.encode(s.text(), add_special_tokens=False)
    chunks = list(s.token_chunks(tok, 256))
    assert [len(c) for c in chunks[:-1]] == [256] * (len(chunks) - 1)
    assert sum(chunks, []) == ids
    blocks = list(s.token_ids(tok, block_chars=1000))
    assert len(blocks) > 5 and sum(blocks, []) == ids


def test_large_document_is_lazy_and_fast(tok):
    t0 = time.perf_counter()
    s = generate_sample(SyntheticConfig("multihop_qa", 300_000, seed=1), 0, tok)
    total_chars = longest = 0
    for piece in s.pieces():
        total_chars += len(piece)
        longest = max(longest, len(piece))
    elapsed = time.perf_counter() - t0
    assert longest < 200 and total_chars > 1_000_000
    assert elapsed < 10, elapsed
    assert s.num_tokens == 300_000


@pytest.mark.slow
def test_four_million_tokens_streamed(tok):
    s = generate_sample(SyntheticConfig("niah_single", 4_000_000, depth=0.75), 0, tok)
    found_at = None
    count = 0
    for piece in s.pieces():
        if s.answers[0] in piece:
            found_at = count
        count += 1
    assert found_at is not None and abs(found_at / count - 0.75) < 0.01
    assert s.num_tokens == 4_000_000


def test_dataset_and_records(tok):
    ds = S.SyntheticDataset(SyntheticConfig("niah_single", 400, seed=3), tok, 5)
    assert len(ds) == 5 and ds[-1].index == 4
    rec = ds[2].to_record()
    assert rec.document == ds[2].text() and rec.answers == ds[2].answers and rec.index == 2
    assert rec.extra["task"] == "niah_single" and rec.data_source == "synthetic_niah_single"
    with pytest.raises(IndexError):
        ds[5]


def test_config_validation():
    with pytest.raises(ValueError):
        SyntheticConfig("nope", 100)
    with pytest.raises(ValueError):
        SyntheticConfig("niah_single", 100, depth=1.5)
    with pytest.raises(ValueError):
        SyntheticConfig("multihop_qa", 100, hops=5)


# ---------------------------------------------------------------------------------------------
# knobs of the main job's task: chunk-aligned facts, keyed_recall, value digits
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["keyed_recall", "niah_multikey"])
def test_chunk_aligned_facts_never_straddle_a_chunk(tok, task):
    straddled = 0
    for index in range(30):
        for aligned in (False, True):
            cfg = SyntheticConfig(task, num_tokens=640, num_distractors=12, chunk_tokens=32, chunk_aligned=aligned)
            sample = generate_sample(cfg, index, tok)
            ids = tok.encode(sample.text(), add_special_tokens=False)
            for fact in sample.facts:
                start, end = fact.token_offset, fact.token_offset + fact.num_tokens
                assert tok.decode(ids[start:end]) == fact.text  # offsets are exact
                crosses = start // 32 != (end - 1) // 32
                if aligned:
                    assert not crosses or end > len(ids) - 2 * fact.num_tokens * len(sample.facts), (index, fact)
                else:
                    straddled += crosses
    assert straddled > 0  # without the knob facts do straddle: the test can tell


def test_keyed_recall_scales_to_many_lookalikes(tok):
    sample = generate_sample(SyntheticConfig("keyed_recall", num_tokens=4000, num_distractors=200), 3, tok)
    key = re.search(r"for (\w+)\?", sample.question).group(1).lower()
    answer = [f for f in sample.facts if f.role == "answer"]
    assert len(answer) == 1 and answer[0].triple == (key, "secret_word", sample.answers[0])
    assert all(f.triple[0] != key and f.triple[2] != sample.answers[0] for f in sample.facts if f.role != "answer")
    assert len(sample.facts) == 201
    assert sample.text().count(f" for {key} is ") == 1


def test_value_digits(tok):
    sample = generate_sample(SyntheticConfig("niah_multikey", num_tokens=300, value_digits=3), 0, tok)
    assert all(len(f.triple[2]) == 3 for f in sample.facts)
    with pytest.raises(ValueError, match="value_digits"):
        SyntheticConfig("niah_single", num_tokens=300, value_digits=0)
    with pytest.raises(ValueError, match="too many distinct"):
        generate_sample(SyntheticConfig("niah_multikey", num_tokens=3000, num_distractors=20, value_digits=1), 0, tok)


# ---------------------------------------------------------------------------------------------
# the main job's task with look-alikes: the question matters
# ---------------------------------------------------------------------------------------------


def _main_job_task(multiplier: int, hops: int | None = None):
    """The main job's task as configs/tiny_synthetic.py sets it (one look-alike per chunk, one of them in the asked
    fact's chunk, "Remember <creature> <Word>." facts) at `multiplier` x its training length."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"))
    try:
        import tiny_synthetic
    finally:
        sys.path.pop(0)
    from memagent_jax.pipeline import task_config

    cfg = tiny_synthetic.get_config()
    return task_config(cfg, multiplier * cfg.task.train_chunks, seed=11, hops=hops)


def _policy_answers(sample, use_question: bool) -> str:
    """A rule answer: the word of the last keyed fact of the document, or the one the question names."""
    key = re.search(r"for (\w+)\?", sample.question).group(1).lower()
    stated = [f for f in sample.facts if f.triple[1] == "secret_word"]
    if not use_question:
        return stated[-1].triple[2]
    return next(f.triple[2] for f in stated if f.triple[0] == key)


@pytest.mark.parametrize("multiplier", [1, 4])
def test_default_task_needs_the_question(tok, multiplier):
    """Keeping the last fact read scores 1/k on rows with k facts; reading the question scores 100%."""
    cfg = _main_job_task(multiplier)
    by_k: dict[int, list[bool]] = {}
    for index in range(240):
        sample = generate_sample(cfg, index, tok)
        k = len(sample.facts)
        assert k >= 1 + multiplier  # the asked fact and look-alikes of the same form (more with the length)
        assert all(re.fullmatch(r" Remember \w+ \w+\.", f.text) for f in sample.facts)
        assert _policy_answers(sample, use_question=True) == sample.answers[0]
        by_k.setdefault(k, []).append(_policy_answers(sample, use_question=False) == sample.answers[0])
    for k, hits in by_k.items():
        assert sum(hits) / len(hits) <= 1 / k, (k, sum(hits), len(hits))
    # The asked fact sits first, in the middle and last, nearly always with a look-alike in its chunk.
    ordinals, shared = set(), 0
    for index in range(30):
        sample = generate_sample(cfg, index, tok)
        roles = [f.role for f in sample.facts]
        at = roles.index("answer")
        ordinals.add("first" if at == 0 else "last" if at == len(roles) - 1 else "middle")
        chunk = sample.facts[at].token_offset // cfg.chunk_tokens
        shared += any(f.token_offset // cfg.chunk_tokens == chunk for f in sample.facts if f.role != "answer")
    assert ordinals == {"first", "middle", "last"} and shared >= 27


def test_same_chunk_lookalikes_sit_beside_the_asked_fact(tok):
    cfg = SyntheticConfig(
        "keyed_recall", num_tokens=256, num_distractors=6, chunk_tokens=32, chunk_aligned=True, same_chunk_distractors=1
    )
    shared = 0
    for index in range(40):
        sample = generate_sample(cfg, index, tok)
        at = [f.role for f in sample.facts].index("answer")
        assert at == index % len(sample.facts)
        chunk = sample.facts[at].token_offset // 32
        shared += any(f.token_offset // 32 == chunk for f in sample.facts if f.role == "distractor")
    assert shared >= 36  # nearly always in the same chunk (a block that would straddle moves whole)
    with pytest.raises(ValueError, match="isolate_answer"):
        SyntheticConfig("keyed_recall", 256, chunk_tokens=32, same_chunk_distractors=1, isolate_answer=True)


def test_two_hop_keyed_recall(tok):
    cfg = _main_job_task(4, hops=2)
    for index in range(20):
        sample = generate_sample(cfg, index, tok)
        pointer = next(f for f in sample.facts if f.role == "answer")
        target = next(f for f in sample.facts if f.role == "support")
        key = re.search(r"for (\w+)\?", sample.question).group(1).lower()
        assert pointer.triple == (key, "same_word_as", target.triple[0])
        assert target.triple[2] == sample.answers[0]
        assert pointer.token_offset < target.token_offset  # the chain reads in order
        assert all(f.triple[0] not in (key, target.triple[0]) for f in sample.facts if f.role == "distractor")
        # One hop is not enough: the asked creature's own fact names no word.
        assert sample.answers[0] not in pointer.text


def test_key_pairs_drill_one_pair_per_document(tok):
    """With key_pairs, each document asks about a pair's first creature and every look-alike is for its second;
    both pairs are drawn, and the rows without key_pairs are unchanged."""
    pairs = (("falcon", "osprey"), ("puffin", "gecko"))
    cfg = _main_job_task(4).replace(key_pairs=pairs)
    seen = set()
    for index in range(24):
        sample = generate_sample(cfg, index, tok)
        asked = re.search(r"for (\w+)\?", sample.question).group(1).lower()
        lookalike = dict(pairs)[asked]
        distractors = [f for f in sample.facts if f.role == "distractor"]
        assert len(distractors) == cfg.num_distractors
        assert all(f.triple[0] == lookalike and f.triple[2] != sample.answers[0] for f in distractors)
        seen.add(asked)
    assert seen == {"falcon", "puffin"}
    plain = _main_job_task(4)
    assert generate_sample(plain, 5, tok).text() == generate_sample(plain.replace(key_pairs=()), 5, tok).text()
    with pytest.raises(ValueError, match=r"key_pairs\[1\] must be two different creatures"):
        _main_job_task(4).replace(key_pairs=(("falcon", "osprey"), ("falcon", "falcon")))
    with pytest.raises(ValueError, match=r"key_pairs\[0\] must be two different creatures"):
        _main_job_task(4).replace(key_pairs=(("falcon", "dragon"),))
    with pytest.raises(ValueError, match="key_pairs is read by the keyed_recall task only"):
        SyntheticConfig("niah_single", num_tokens=256, key_pairs=(("falcon", "osprey"),))


def test_documents_fill_their_length_exactly_most_of_the_time(tok):
    cfg = _main_job_task(2).replace(exact_length=True)
    lengths = [n_tokens(tok, generate_sample(cfg, i, tok).text()) for i in range(100)]
    assert sum(n == cfg.num_tokens for n in lengths) >= 90
    assert all(cfg.num_tokens - 2 <= n <= cfg.num_tokens for n in lengths)


def test_concatenated_records(tok):
    cfg = _main_job_task(1).replace(exact_length=True)
    records = list(S.concatenated_records(cfg, 12, 5, tok))
    assert len(records) == 12
    for record in records:
        ids = tok.encode(record.document, add_special_tokens=False)
        assert len(ids) == 5 * cfg.num_tokens  # every part whole, so every part starts on a chunk boundary
        part = record.extra["asked_part"]
        assert 0 <= part < 4  # never the last
        asked = generate_sample(cfg, record.extra["asked_index"], tok)
        assert record.question == asked.question and record.answers == asked.answers
        start = part * cfg.num_tokens
        assert tok.decode(ids[start : start + cfg.num_tokens]) == asked.text()
        key = re.search(r"for (\w+)\?", record.question).group(1).lower()
        assert record.document.count(f" Remember {key} ") == 1  # the answer stays unique
        assert record.document.count(f" {record.answers[0]}.") == 1
        # Later parts hold later look-alike facts: the asked fact is not the last fact of the document.
        assert record.document.rindex(" Remember ") > record.document.index(f" Remember {key} ")
    with pytest.raises(ValueError, match="parts"):
        next(S.concatenated_records(cfg, 1, 1, tok))


# ---------------------------------------------------------------------------------------------
# registry and the seeding contract
# ---------------------------------------------------------------------------------------------


def test_builtin_tasks_and_their_defaults():
    """Metric, reward style and defaults of every built-in task, as the task modules document them."""
    expected = {
        "niah_single": ("string_match_all", "boxed_em", 0, 1),
        "niah_multikey": ("string_match_all", "boxed_em", 3, 1),
        "niah_multivalue": ("string_match_all", "boxed_all", 0, 1),
        "niah_multiquery": ("string_match_all", "boxed_all", 0, 1),
        "keyed_recall": ("string_match_all", "boxed_em", 3, 1),
        "variable_tracking": ("string_match_all", "boxed_all", 2, 4),
        "multihop_qa": ("sub_em", "boxed_em", 3, 2),
    }
    assert S.TASKS == tuple(expected) and S.task_names()[: len(S.TASKS)] == S.TASKS
    for name, (metric, reward_style, distractors, hops) in expected.items():
        cfg = SyntheticConfig(name, num_tokens=100)
        assert (cfg.metric, cfg.reward_style, cfg.resolved_distractors, cfg.resolved_hops) == expected[name]
        assert S.get_task(name).name == name


def test_unknown_task_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown synthetic task 'nope'; known tasks: niah_single, .*multihop_qa"):
        S.get_task("nope")
    with pytest.raises(ValueError, match="keyed_recall, variable_tracking"):
        SyntheticConfig("nope", 100)


@pytest.mark.parametrize(
    "task,hops,ok",
    [
        ("keyed_recall", 4, True),
        ("keyed_recall", 5, False),
        ("variable_tracking", 0, False),
        ("multihop_qa", 0, False),
        ("niah_single", 0, True),
    ],
)
def test_hops_checked_per_task(task, hops, ok):
    if ok:
        SyntheticConfig(task, 100, hops=hops)
    else:
        with pytest.raises(ValueError, match="hops"):
            SyntheticConfig(task, 100, hops=hops)


def test_register_a_task(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # leave the real registry as it was

    def make(cfg, rng, index):
        colour = rng.choice(("red", "blue"))
        drafts = [S.Draft(f" The box {index} is {colour}.", "answer", (f"box {index}", "colour", colour))]
        return f"What colour is box {index}?", (colour,), drafts

    task = S.register_task(S.SyntheticTask("box_colour", make, "sub_em", "boxed_em"))
    assert S.get_task("box_colour") is task and "box_colour" in S.task_names() and "box_colour" not in S.TASKS
    with pytest.raises(ValueError, match="already registered"):
        S.register_task(task)
    sample = generate_sample(SyntheticConfig("box_colour", num_tokens=120, seed=1), 5, S.whitespace_counter)
    assert sample.question == "What colour is box 5?" and sample.answers[0] in ("red", "blue")
    assert (sample.metric, sample.reward_style) == ("sub_em", "boxed_em")
    assert sample.text().count(" The box 5 is ") == 1 and 0.98 * 120 <= sample.num_tokens <= 120
    rec = sample.to_record()
    assert rec.data_source == "synthetic_box_colour" and rec.extra["task"] == "box_colour"


def test_derive_seed_is_a_sha256_of_the_parts():
    digest = hashlib.sha256(b"'task'\x1f'niah_single'\x1f3\x1f5").digest()
    assert derive_seed("task", "niah_single", 3, 5) == int.from_bytes(digest[:8], "little")


@pytest.mark.parametrize("task", S.TASKS)
def test_seeding_contract(task):
    """The question, answers and facts come from the task RNG (task, seed, index, count knobs); the filler from the
    filler RNG (task, seed, index): what a seed determines, independent of how the generator is laid out."""
    cfg = SyntheticConfig(task, num_tokens=700, seed=4)
    index = 6
    sample = generate_sample(cfg, index, S.whitespace_counter)
    rng = random.Random(
        derive_seed(
            "task", task, cfg.seed, index, cfg.resolved_distractors, cfg.resolved_hops, cfg.num_values, cfg.num_queries
        )
    )
    question, answers, drafts = S.get_task(task).make(cfg, rng, index)
    assert (sample.question, sample.answers) == (question, tuple(answers))
    assert sorted(f.text for f in sample.facts) == sorted(d.text for d in drafts)
    filler = random.Random(derive_seed("filler", task, cfg.seed, index))
    sentences = [p for p in sample.pieces() if p not in {f.text for f in sample.facts}]
    assert sentences[0] == "".join(sentence_units(filler)) + "."
    assert sentences[1] == "".join(sentence_units(filler)) + "."
