"""The main job (memagent_jax.pipeline) end to end in its quick variant, and the PyTorch cross-check of its
exported model: transformers + a plain-Python agent loop give the same greedy answers as our JAX chunk scan."""

import csv
import json
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**changes):
    from memagent_jax.configs import tiny_synthetic

    cfg = tiny_synthetic.get_config("quick")
    for key, value in changes.items():
        section, field = key.split(".")
        cfg[section][field] = value
    return cfg


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    from memagent_jax import pipeline

    workdir = str(tmp_path_factory.mktemp("main_job"))
    summary = pipeline.run(_config(), workdir)
    return workdir, summary


def test_quick_main_job_writes_every_artefact(quick_run):
    workdir, summary = quick_run
    for path in [
        "assets/tokenizer/tokenizer.json",
        "assets/tokenizer/tokenizer_config.json",
        "assets/initial_model/config.json",
        "assets/train.jsonl",
        "assets/eval_1x.jsonl",
        "assets/eval_4x.jsonl",
        "assets/eval_two_hop_1x.jsonl",
        "assets/eval_other_fact_1x.jsonl",
        "assets/eval_concat_4x.jsonl",
        "warm_start/export/config.json",
        "warm_start/metrics.jsonl",
        "rl/export/config.json",
        "rl/metrics.jsonl",
        "eval/results.json",
        "eval/results.csv",
        "eval/accuracy_vs_length.png",
        "eval/per_word.txt",
        "eval/per_key.txt",
        "eval/key_confusion.txt",
        "report.md",
        "report.html",
        "summary.json",
    ]:
        assert os.path.exists(os.path.join(workdir, path)), path
    with open(os.path.join(workdir, "assets/tokenizer/tokenizer_config.json")) as f:
        tokenizer_config = json.load(f)
    assert "chat_template" in tokenizer_config or os.path.exists(
        os.path.join(workdir, "assets/tokenizer/chat_template.jinja")
    )

    figures = summary["results"]
    assert set(figures) == {"warm_start", "RL"}
    for model, by_length in figures.items():
        assert set(by_length) == {"1x", "4x", "two_hop_1x", "other_fact_1x", "concat_4x"}
        for label, row in by_length.items():
            assert 0.0 <= row["accuracy_low"] <= row["accuracy"] <= row["accuracy_high"] <= 1.0, (model, label)
            assert row["n"] == 32
            per_word = row["per_word"]  # accuracy per answer word adds up to the file's
            assert sum(n for _, n in per_word.values()) == 32
            assert sum(h for h, _ in per_word.values()) / 32 == pytest.approx(row["accuracy"])
            per_key = row["per_key"]  # ... and per asked creature, each named by the question
            assert "" not in per_key and sum(n for _, n in per_key.values()) == 32
            assert sum(h for h, _ in per_key.values()) / 32 == pytest.approx(row["accuracy"])
        assert by_length["4x"]["chunks"] == pytest.approx(4 * by_length["1x"]["chunks"], rel=0.05)
        assert by_length["concat_4x"]["chunks"] == pytest.approx(4 * by_length["1x"]["chunks"], rel=0.05)
    with open(os.path.join(workdir, "eval/results.csv")) as f:
        assert len(list(csv.DictReader(f))) == 10  # 2 models x 5 files
    # The key-confusion probe: every ordered pair of the 16 creatures, three states, for both models.
    for model in ("warm_start", "RL"):
        for state, c in summary["key_confusion"][model].items():
            assert c["pairs"] == 16 * 15 and 0.0 <= c["mean"] <= 1.0, (model, state)

    def facts_per_row(name):  # the asked fact and its look-alikes ("Remember <creature> <Word>.")
        with open(os.path.join(workdir, "assets", name)) as f:
            return {json.loads(line)["context"].count("Remember ") for line in f}

    # GRPO rows (task.rl_chunks = 4 chunks): the asked fact + 3 look-alikes per chunk x 4 chunks, or (two-hop rows,
    # half of them) the chain's two facts + the 12 look-alikes; evaluation rows at 1x (2 chunks): + 1 per chunk.
    assert facts_per_row("train.jsonl") == {13, 14} and facts_per_row("eval_1x.jsonl") == {3}
    assert facts_per_row("eval_two_hop_1x.jsonl") == {4}
    with open(os.path.join(workdir, "assets/eval_other_fact_1x.jsonl")) as f:
        for line in f:  # asked about a look-alike: its creature is named once, right before the answer
            row = json.loads(line)
            creature = row["input"].removeprefix("What is the secret word for ").removesuffix("?")
            assert row["context"].count(f" {creature} ") == 1
            assert f" Remember {creature} {row['answers'][0]}." in row["context"]

    # The warm start learned the game: its SFT loss fell, and it writes \boxed{} answers.
    with open(os.path.join(workdir, "warm_start/metrics.jsonl")) as f:
        losses = [json.loads(line)["loss"] for line in f]
    assert losses[-1] < losses[0]
    with open(os.path.join(workdir, "rl/metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    steps = [row for row in rows if "reward_mean" in row]
    assert len(steps) == 2 and all(0.0 <= s["reward_mean"] <= 1.0 for s in steps)
    # Held-out accuracy while training (every step in the quick variant, and the start), drawn against the step.
    assert [row["step"] for row in rows if "eval/accuracy_mean" in row] == [0, 1, 2]
    assert os.path.getsize(os.path.join(workdir, "eval/accuracy_vs_step.png")) > 10_000

    report = open(os.path.join(workdir, "report.md"), encoding="utf-8").read()
    assert "secret word" in report and "RL" in report and "warm_start" in report
    # Warm start and RL side by side on the same question, and a model column in the summary table.
    assert "| # | question | model | verdict |" in report
    assert (
        "### Side by side:" in report and "| step | relevant sentences of the chunk | `warm_start` | `RL` |" in report
    )


@pytest.mark.slow
def test_long_eval_stage_reports_accuracy_speed_and_memory(quick_run, tmp_path):
    """The off-by-default long point, shrunk: accuracy with its interval, tokens/s, peak RSS, and the plot."""
    from memagent_jax import pipeline

    workdir, summary = quick_run
    cfg = pipeline.resolve_config(
        _config(**{"long_eval.chunks": 48, "long_eval.questions": 3, "long_eval.batch_size": 2})
    )
    assets = pipeline.make_assets(cfg, os.path.join(workdir, "assets"))
    info = pipeline.long_eval(cfg, assets, summary["models"]["RL"], str(tmp_path / "long"))
    assert info["questions"] == 3 and info["chunks"] == 48
    assert info["tokens_per_document"] == pytest.approx(48 * cfg.agent.chunk_tokens, rel=0.02)
    assert 0.0 <= info["accuracy_low"] <= info["accuracy"] <= info["accuracy_high"] <= 1.0
    assert info["document_tokens_per_s"] > 0 and len(info["peak_rss_bytes_after_each_batch"]) == 2
    again = pipeline.long_eval(cfg, assets, summary["models"]["RL"], str(tmp_path / "long"))  # resumes: no rerun
    assert again == info
    path = pipeline.plot_results(cfg, summary["results"], info, str(tmp_path / "plot.png"))
    assert os.path.getsize(path) > 10_000


@pytest.mark.slow
def test_quick_main_job_resumes_without_redoing_stages(quick_run, capsys):
    from memagent_jax import pipeline

    workdir, first = quick_run
    mtime = os.path.getmtime(os.path.join(workdir, "rl/export/config.json"))
    again = pipeline.run(_config(), workdir)
    assert again["results"] == first["results"]
    assert os.path.getmtime(os.path.join(workdir, "rl/export/config.json")) == mtime


@pytest.mark.slow
def test_exported_model_in_pytorch_gives_the_same_greedy_answers(quick_run):
    """The exported RL model in transformers + the plain-Python loop == the JAX chunk scan (greedy), token for
    token: every memory update's prompt and response ids, the carried memories, the final prompt, the answer ids
    and whether the answer ended on a stop token."""
    from memagent_jax import pipeline
    from memagent_jax.agent import MemoryAgent
    from memagent_jax.agent.torch_loop import load_torch_model, torch_agent_run
    from memagent_jax.data.formats import read_records
    from memagent_jax.evaluation import load_model

    workdir, summary = quick_run
    cfg = pipeline.resolve_config(_config())
    folder = summary["models"]["RL"]
    records = read_records(os.path.join(workdir, "assets/eval_4x.jsonl"))[:4]
    loaded = load_model(folder)
    budgets, templates = pipeline.agent_budgets(cfg), pipeline.agent_templates(cfg)
    agent = MemoryAgent(loaded.params, loaded.config, loaded.tokenizer, budgets=budgets, templates=templates)
    jax_result = agent.run([r.question for r in records], [r.document for r in records], trace=True, record=True)

    model = load_torch_model(folder)
    for i, record in enumerate(records):
        ref = torch_agent_run(
            model, loaded.tokenizer, record.question, record.document, budgets=budgets, templates=templates
        )
        convs = jax_result.conversations[i]
        memory_convs = [c for c in convs if c.kind == "memory"]
        assert len(ref.memories) == len(memory_convs) == jax_result.num_chunks[i] > 1, i  # a 4x document
        assert [c.prompt_ids.tolist() for c in memory_convs] == ref.prompt_ids, i
        assert [c.response_ids.tolist() for c in memory_convs] == ref.response_ids, i
        assert ref.memories == jax_result.traces[i], i
        assert convs[-1].prompt_ids.tolist() == ref.final_prompt_ids, i
        assert list(jax_result.answer_ids[i]) == ref.answer_ids, i
        assert ref.answer == jax_result.answers[i], i
        assert ref.finished == jax_result.finished[i], i


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("task.name", "nope", r"config\.task\.name"),
        ("task.eval_multipliers", "1;x", r"config\.task\.eval_multipliers"),
        ("task.rl_distractors_per_chunk", -0.5, r"task\.rl_distractors_per_chunk must be >= 0"),
        ("rl.max_sampling_batches", 0, r"rl\.max_sampling_batches must be >= 1"),
        ("rl.warmup_steps", -1, r"rl\.warmup_steps must be >= 0"),
        ("task.rl_absent_fraction", 0.6, r"task\.rl_absent_fraction must be in \[0, 1 - task\.train_two_hop"),
        ("agent.memory_update", "Notes: {memory}", r"config\.agent: memory_update: placeholder \{question\}"),
    ],
)
def test_config_errors_name_the_field(field, value, message):
    from memagent_jax import pipeline

    with pytest.raises(pipeline.PipelineConfigError, match=message):
        pipeline.resolve_config(_config(**{field: value}))


def test_quick_variant_is_an_override_block_of_the_main_job():
    from memagent_jax.configs import tiny_synthetic

    full, quick = tiny_synthetic.get_config(), tiny_synthetic.get_config("quick")
    assert (full.rl.steps, quick.rl.steps) == (90, 2)
    assert full.model.to_dict() == quick.model.to_dict() and full.agent.to_dict() == quick.agent.to_dict()
    with pytest.raises(ValueError, match="unknown variant 'fast'"):
        tiny_synthetic.get_config("fast")


def test_grpo_learning_rate_warms_up_from_zero_over_the_configured_steps():
    import numpy as np

    from memagent_jax import pipeline
    from memagent_jax.rl import learner, recipe

    cfg = pipeline.resolve_config(_config(**{"rl.warmup_steps": 4, "rl.learning_rate": 2e-4}))
    labels = pipeline.training_eval_labels(cfg)
    assets = {"train_file": "train.jsonl", "templates": "t.json", "eval_files": {k: f"{k}.jsonl" for k in labels}}
    optimizer = recipe.learner_config(pipeline.grpo_config(cfg, assets, "model")).optimizer
    rates = [float(learner.learning_rate_schedule(optimizer)(np.int32(s))) for s in range(6)]
    # Step 0 moves nothing (Adam's moments see one gradient first), then a linear ramp to the constant rate.
    np.testing.assert_allclose(rates, [0.0, 0.5e-4, 1e-4, 1.5e-4, 2e-4, 2e-4], rtol=1e-6)
    default = recipe.learner_config(pipeline.grpo_config(pipeline.resolve_config(_config()), assets, "model"))
    np.testing.assert_allclose(float(learner.learning_rate_schedule(default.optimizer)(np.int32(0))), 2e-4, rtol=1e-6)


def test_rl_distractor_density_defaults_to_the_evaluation_files():
    from memagent_jax import pipeline

    # -1 means the look-alike density of the warm start's rows and of the evaluation files.
    same = pipeline.resolve_config(_config(**{"task.rl_distractors_per_chunk": -1.0}))
    assert pipeline.rl_distractors_per_chunk(same) == same.task.distractors_per_chunk
    assert pipeline.rl_distractors_per_chunk(pipeline.resolve_config(_config())) == 3.0


def test_absent_rows_ask_about_a_creature_the_document_never_names(quick_run, tmp_path):
    """`task.rl_absent_fraction` of the GRPO rows, all single-hop, lose their asked fact to a look-alike's of the
    same length in tokens, and their answer is the script's 'unknown' (which the reward scores right); every other
    row is the row the job writes without them."""
    from memagent_jax import pipeline
    from memagent_jax.data.tokenizer import load_tokenizer
    from memagent_jax.evaluation.verifier import reward

    workdir, _ = quick_run
    cfg = pipeline.resolve_config(_config(**{"task.rl_absent_fraction": 0.125}))
    paths = pipeline.make_assets(cfg, str(tmp_path / "assets"))

    def rows(path):
        with open(path) as f:
            return [json.loads(line) for line in f]

    plain, absent = rows(os.path.join(workdir, "assets", "train.jsonl")), rows(paths["train_file"])
    assert len(plain) == len(absent) == cfg.task.train_samples
    marked = [i for i in range(len(absent)) if pipeline.is_absent_row(cfg, i)]
    assert len(marked) == len(absent) // 8 and not any(pipeline.is_two_hop_row(cfg, i) for i in marked)
    assert not any(pipeline.is_absent_row(pipeline.resolve_config(_config()), i) for i in range(64))  # default: none
    tokenizer = load_tokenizer(os.path.join(workdir, "assets", "tokenizer"))
    for i, (was, now) in enumerate(zip(plain, absent)):
        if i not in marked:
            assert now == was, i
            continue
        asked = was["prompt"][0]["content"].rstrip("?").split()[-1]
        assert f" {asked} " in was["context"] and f" {asked} " not in now["context"], i
        assert now["reward_model"]["ground_truth"] == ["unknown"], i
        assert reward(r"\boxed{ unknown}", now["reward_model"]["ground_truth"]) == 1.0
        assert len(tokenizer.encode(now["context"])) == len(tokenizer.encode(was["context"])), i


def test_only_a_single_hop_row_can_lose_its_asked_fact():
    import random

    from memagent_jax import pipeline
    from memagent_jax.data.records import QARecord

    chain = QARecord("What is the secret word for otter?", " Remember otter as heron. Remember heron Mi.", ("Mi",))
    with pytest.raises(ValueError, match="expected the asked fact ' Remember otter Mi.' once"):
        pipeline.without_asked_fact(chain, random.Random(0))


def test_warm_start_documents_take_their_own_look_alike_density(monkeypatch):
    """`task.warm_distractors_per_chunk` reaches the warm start's scripted documents (single-hop and two-hop);
    -1 is the evaluation files' density, and a negative density is refused, naming the field."""
    from memagent_jax import pipeline

    default = pipeline.resolve_config(_config(**{"task.warm_distractors_per_chunk": -1.0}))
    assert pipeline.warm_distractors_per_chunk(default) == default.task.distractors_per_chunk
    cfg = pipeline.resolve_config(_config(**{"task.warm_distractors_per_chunk": 3.0}))
    seen = []

    class Enough(Exception):
        pass

    def spy(cfg, chunks, seed, hops=None, exact_length=False, per_chunk=None):
        seen.append((hops, per_chunk))
        if len(seen) == 2:
            raise Enough

    monkeypatch.setattr(pipeline, "task_config", spy)
    with pytest.raises(Enough):
        next(pipeline.scripted_batches(cfg, None, None, None, 0, 1, 1))
    assert seen == [(None, 3.0), (2, 3.0)]
    with pytest.raises(pipeline.PipelineConfigError, match=r"task\.warm_distractors_per_chunk must be >= 0"):
        pipeline.resolve_config(_config(**{"task.warm_distractors_per_chunk": -2.0}))


def test_confused_pairs_are_those_above_the_threshold_in_either_note_state():
    import numpy as np

    from memagent_jax import pipeline
    from memagent_jax.evaluation.key_confusion import KeyConfusion

    nan = float("nan")
    unknown = np.array([[nan, 0.9, 0.0], [0.1, nan, 0.2], [0.0, 0.35, nan]])
    held = np.array([[nan, 0.0, 0.4], [0.0, nan, 0.0], [0.0, 0.0, nan]])
    probe = KeyConfusion(("a", "b", "c"), {"unknown": unknown, "held": held})
    assert pipeline.confused_pairs(probe, 0.3) == {"a<b": 0.9, "a<c": 0.4, "c<b": 0.35}
    assert pipeline.confused_pairs(probe, 0.95) == {}


def test_hard_pair_replay_drills_the_pairs_found_and_keeps_the_cleanest_model(quick_run, tmp_path, monkeypatch):
    """After the SFT the warm start probes its model, drills the pairs found above the threshold, probes again,
    and exports the checked model with the fewest confused pairs. The probe runs for real; its figures are then
    replaced by scripted ones that get worse each round, so the model kept must be the SFT's own."""
    import jax
    import numpy as np

    from memagent_jax import pipeline
    from memagent_jax.data.synthetic.vocabulary import KEY_CREATURES
    from memagent_jax.models import load_hf_params

    workdir, _ = quick_run
    cfg = pipeline.resolve_config(
        _config(**{"warm_start.replay_rounds": 2, "warm_start.replay_updates": 8, "warm_start.replay_threshold": 0.3})
    )
    assets = pipeline.make_assets(cfg, os.path.join(workdir, "assets"))
    scripted = [  # (asked, look-alike, p) per check: one pair after the SFT, then two, then three
        [("falcon", "otter", 0.9)],
        [("otter", "badger", 0.95), ("badger", "heron", 0.8)],
        [("otter", "badger", 0.95), ("badger", "heron", 0.8), ("lynx", "moth", 0.6)],
    ]
    seen_params, batches_calls = [], []
    real_probe, real_batches = pipeline.probe_key_confusion, pipeline.scripted_batches

    def probe(cfg, tokenizer, prompts, params, model_config, states=None):
        result = real_probe(cfg, tokenizer, prompts, params, model_config, states)
        assert set(result.probability) == {"unknown", "held"}
        seen_params.append(jax.device_get(params))
        unknown = np.zeros_like(result.probability["unknown"])
        for a, b, p in scripted[len(seen_params) - 1]:
            unknown[KEY_CREATURES.index(a), KEY_CREATURES.index(b)] = p
        result.probability = {"unknown": unknown, "held": np.zeros_like(unknown)}
        return result

    def batches(*args, **kwargs):
        batches_calls.append(kwargs.get("key_pairs", ()))
        return real_batches(*args, **kwargs)

    monkeypatch.setattr(pipeline, "probe_key_confusion", probe)
    monkeypatch.setattr(pipeline, "scripted_batches", batches)
    pipeline.warm_start(cfg, assets, str(tmp_path))
    with open(tmp_path / "DONE.json") as f:
        done = json.load(f)
    assert [c["after"] for c in done["replay"]["checks"]] == ["SFT", "replay round 1", "replay round 2"]
    assert [c["score"][0] for c in done["replay"]["checks"]] == [1, 2, 3]
    assert done["replay"]["kept"] == "SFT" and done["updates"] == cfg.warm_start.updates + 2 * 8
    assert batches_calls == [(), (("falcon", "otter"),), (("otter", "badger"), ("badger", "heron"))]
    exported, _ = load_hf_params(str(tmp_path / "export"))
    for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(seen_params[0])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert any(  # the rounds did train: the last model checked is another
        not np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(jax.tree.leaves(seen_params[0]), jax.tree.leaves(seen_params[2]))
    )
    with pytest.raises(pipeline.PipelineConfigError, match=r"warm_start\.replay_threshold must be in \(0, 1\)"):
        pipeline.resolve_config(_config(**{"warm_start.replay_rounds": 1, "warm_start.replay_threshold": 1.5}))
    with pytest.raises(pipeline.PipelineConfigError, match=r"warm_start\.replay_rounds needs task\.name"):
        pipeline.resolve_config(_config(**{"warm_start.replay_rounds": 1, "warm_start.note_style": "value"}))


def test_grpo_pair_replay_drills_the_pairs_found_and_a_resumed_run_drills_the_same(quick_run, tmp_path, monkeypatch):
    """Inside GRPO the policy is probed every `rl.replay_every` steps; while pairs are found, every other question of
    each draw is a drill row (the pair's first creature asked, `rl.replay_lookalikes` look-alikes, all for the
    second). The probe runs for real and its figures are then scripted per step. A run resumed from a checkpoint
    between two probes drills the pairs of the probe before it: the same questions as the uninterrupted run."""
    import re
    import shutil

    import numpy as np

    from memagent_jax import pipeline
    from memagent_jax.data.synthetic.vocabulary import KEY_CREATURES
    from memagent_jax.rl import rollout

    workdir, _ = quick_run
    cfg = pipeline.resolve_config(
        _config(**{"rl.steps": 3, "rl.eval_every": 0, "rl.replay_every": 2, "rl.replay_lookalikes": 2})
    )
    assets = pipeline.make_assets(cfg, os.path.join(workdir, "assets"))
    warm = os.path.join(workdir, "warm_start", "export")
    scripted = {0: [("falcon", "otter", 0.9)], 2: []}  # the probe's pairs at each step it runs
    now, seen = {}, []
    real_probe, real_before = pipeline.probe_key_confusion, pipeline.PairReplay.before_step
    real_collect = rollout.collect_rollouts_in_slices

    def before_step(self, step, params):
        now["step"] = step
        return real_before(self, step, params)

    def probe(cfg, tokenizer, prompts, params, model_config, states=None):
        result = real_probe(cfg, tokenizer, prompts, params, model_config, states)
        assert set(result.probability) == {"unknown", "held"}
        unknown = np.zeros_like(result.probability["unknown"])
        for a, b, p in scripted[now["step"]]:
            unknown[KEY_CREATURES.index(a), KEY_CREATURES.index(b)] = p
        result.probability = {"unknown": unknown, "held": np.zeros_like(unknown)}
        return result

    def collect(agent, records, *args, **kwargs):
        seen.append((now["step"], [(r.question, r.document) for r in records]))
        return real_collect(agent, records, *args, **kwargs)

    monkeypatch.setattr(pipeline.PairReplay, "before_step", before_step)
    monkeypatch.setattr(pipeline, "probe_key_confusion", probe)
    monkeypatch.setattr(rollout, "collect_rollouts_in_slices", collect)
    folder = tmp_path / "rl"
    pipeline.reinforce(cfg, assets, warm, str(folder))
    with open(folder / "DONE.json") as f:
        assert json.load(f)["replay"] == [{"step": 0, "pairs": {"falcon<otter": 0.9}}, {"step": 2, "pairs": {}}]
    with open(assets["train_file"]) as f:
        train_documents = {json.loads(line)["context"] for line in f}
    creatures = "|".join(KEY_CREATURES)
    for step, draw in seen:
        assert len(draw) == cfg.rl.questions_per_step
        for j, (question, document) in enumerate(draw):
            if step < 2 and j % 2 == 1:  # a drill row of falcon<otter
                assert question.endswith("for falcon?") and document not in train_documents
                facts = re.findall(rf"Remember ({creatures}) ", document)
                assert sorted(facts) == ["falcon", "otter", "otter"], facts
            else:
                assert document in train_documents
    assert {step for step, _ in seen} == {0, 1, 2}

    # Resume from the checkpoint of step 1 (between the probes): step 1 drills falcon<otter without a new probe.
    original = [draw for draw in seen if draw[0] >= 1]
    checkpoints = folder / "checkpoints"
    for name in os.listdir(checkpoints):
        if name.isdigit() and int(name) > 1:
            shutil.rmtree(checkpoints / name)
    os.remove(folder / "DONE.json")
    shutil.rmtree(folder / "export")
    seen.clear()
    pipeline.reinforce(cfg, assets, warm, str(folder))
    assert seen == original
    with open(folder / "DONE.json") as f:
        assert json.load(f)["replay"] == [{"step": 0, "pairs": {"falcon<otter": 0.9}}, {"step": 2, "pairs": {}}]
    with pytest.raises(pipeline.PipelineConfigError, match=r"rl\.replay_fraction must be in \(0, 1\]"):
        pipeline.resolve_config(_config(**{"rl.replay_every": 1, "rl.replay_fraction": 0.0}))
    with pytest.raises(pipeline.PipelineConfigError, match=r"rl\.replay_every needs task\.name"):
        pipeline.resolve_config(_config(**{"rl.replay_every": 1, "warm_start.note_style": "value"}))


def _fake_summary(accuracies: dict, per_word: dict, per_key: dict | None = None) -> dict:
    return {
        "results": {
            model: {
                label: {
                    "accuracy": acc,
                    "per_word": per_word[model][label],
                    **({"per_key": per_key[model][label]} if per_key else {}),
                }
                for label, acc in by_label.items()
            }
            for model, by_label in accuracies.items()
        },
        "stage_seconds_when_computed": {"rl": 10.0, "eval": 5.0},
    }


def test_seeds_table_is_mean_min_max_per_cell_and_the_weakest_word_of_any_seed():
    from memagent_jax import pipeline

    words = {"RL": {"1x": {"Mor": [1, 2], "Ra": [3, 3]}}, "warm_start": {"1x": {"Mor": [2, 2], "Ra": [1, 3]}}}
    words_b = {"RL": {"1x": {"Mor": [0, 1], "Ra": [4, 4]}}, "warm_start": {"1x": {"Mor": [1, 1], "Ra": [2, 4]}}}
    keys = {"RL": {"1x": {"falcon": [1, 4], "osprey": [3, 3]}}, "warm_start": {"1x": {"falcon": [3, 4]}}}
    summaries = {
        0: _fake_summary({"RL": {"1x": 0.8}, "warm_start": {"1x": 0.6}}, words, keys),
        2: _fake_summary({"RL": {"1x": 0.9}, "warm_start": {"1x": 0.4}}, words_b),  # no per-creature figures
    }
    table = pipeline.seeds_table(summaries)
    assert table["RL"]["1x"]["mean"] == pytest.approx(85.0)
    assert (table["RL"]["1x"]["min"], table["RL"]["1x"]["max"]) == (pytest.approx(80.0), pytest.approx(90.0))
    assert table["RL"]["1x"]["weakest_word"] == ("Mor", 0.0, 2, 1)  # seed 2: 0 of 1
    assert table["warm_start"]["1x"]["weakest_word"] == ("Ra", pytest.approx(100 / 3), 0, 3)
    assert table["RL"]["1x"]["weakest_key"] == ("falcon", 25.0, 0, 4)
    text = pipeline.seeds_markdown(table, [0, 2], {0: 15.0, 2: 15.0})
    row = "| 1x | 85.0 (80.0-90.0) | 50.0 (40.0-60.0) | Mor 0/1 (seed 2) | Ra 1/3 (seed 0) | falcon 1/4 (seed 0) |"
    assert row + " falcon 3/4 (seed 0) |" in text


def test_asked_creature_accuracy_names_the_creature_of_each_question():
    """A creature whose notes a look-alike overwrites shows as one low row, while its answer words look fine."""
    from memagent_jax import pipeline

    rows = [
        {"question": "What is the secret word for falcon?", "answers": ["Ul"], "scores": {"accuracy": 0.0}},
        {"question": "What is the secret word for falcon?", "answers": ["Ra"], "scores": {"accuracy": 1.0}},
        {"question": "What is the secret word for osprey?", "answers": ["Ul"], "scores": {"accuracy": 1.0}},
        {"question": "Which word? (no creature named)", "answers": ["Ra"], "scores": {"accuracy": 1.0}},
    ]
    assert pipeline.asked_key_accuracy(rows) == {"": [1.0, 1], "falcon": [1.0, 2], "osprey": [1.0, 1]}
    figures = {"RL": {"4x": {"accuracy": 0.75, "per_word": pipeline.answer_word_accuracy(rows)}}}
    figures["RL"]["4x"]["per_key"] = pipeline.asked_key_accuracy(rows)
    assert pipeline.worst_word(figures["RL"]["4x"]["per_key"]) == ("falcon", 0.5, 2)
    table = pipeline.per_word_table(figures, field="per_key", name="creature").splitlines()
    assert table[0].split() == ["creature", "RL", "4x"] and table[2].split() == ["falcon", "50", "(2)"]
    assert "falcon 50% of 2" in pipeline.summary_table(figures)


@pytest.mark.faults
@pytest.mark.parametrize("text", ["", "0,x", "1,1", "-1"])
def test_bad_seeds_are_refused(text):
    from memagent_jax import pipeline

    with pytest.raises(pipeline.PipelineConfigError, match="--seeds"):
        pipeline.parse_seeds(text)


@pytest.mark.faults
def test_a_workdir_of_another_config_is_refused_but_long_eval_may_change(tmp_path):
    """Resuming a finished workdir with another seed would silently reuse its stages: refused, naming the field."""
    from memagent_jax import pipeline

    cfg = pipeline.resolve_config(_config())
    pipeline.check_workdir_config(cfg, str(tmp_path))
    pipeline.check_workdir_config(cfg, str(tmp_path))  # the same config resumes
    longer = pipeline.resolve_config(_config(**{"long_eval.enabled": True}))
    pipeline.check_workdir_config(longer, str(tmp_path))  # the off-by-default long point reuses the job
    other = pipeline.resolve_config(_config(**{"rl.steps": 7}))
    with pytest.raises(pipeline.PipelineConfigError, match=r"rl\.steps: 2 -> 7.*new --workdir"):
        pipeline.check_workdir_config(other, str(tmp_path))
    reseeded = pipeline.resolve_config(_config())
    reseeded.seed = 3
    with pytest.raises(pipeline.PipelineConfigError, match=r"seed: 0 -> 3"):
        pipeline.check_workdir_config(reseeded, str(tmp_path))


@pytest.mark.faults
def test_a_workdir_written_before_a_field_existed_resumes_at_the_value_it_ran_with(tmp_path):
    import json

    from memagent_jax import pipeline

    pipeline.check_workdir_config(pipeline.resolve_config(_config()), str(tmp_path))
    path = tmp_path / "job_config.json"
    saved = json.loads(path.read_text())
    del saved["rl"]["warmup_steps"]  # a workdir of the code before the field
    path.write_text(json.dumps(saved))
    pipeline.check_workdir_config(pipeline.resolve_config(_config()), str(tmp_path))  # absent ran as 0: resumes
    warmed = pipeline.resolve_config(_config(**{"rl.warmup_steps": 15}))
    with pytest.raises(pipeline.PipelineConfigError, match=r"rl\.warmup_steps: 0 -> 15"):
        pipeline.check_workdir_config(warmed, str(tmp_path))
