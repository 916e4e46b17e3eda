"""The evaluation entry point: intervals and aggregation against hand computations, the CLI end to end on tiny
random models (two models x two lengths), greedy predictions equal to MemoryAgent.run, clear errors."""

import csv
import json
import math
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from hf_tiny import make_agent_model_dir
from memagent_jax import evaluate as ev
from memagent_jax.agent import AgentBudgets, AgentInputError, AgentResult, MemoryAgent
from memagent_jax.data.formats import open_file, write_eval_file, write_train_file
from memagent_jax.data.records import DataFormatError, QARecord
from memagent_jax.evaluation import (
    SCORE_NAMES,
    EvalConfigError,
    evaluate_agent,
    evaluate_models,
    length_label,
    normal_interval,
    parse_models,
    score_response,
    summarize,
    verifier,
    wilson_interval,
)
from memagent_jax.evaluation.report import averaged_rows, format_table, summarize_rows
from memagent_jax.models import load_hf_params
from memagent_jax.models.sharding import make_mesh
from memagent_jax.sampling import SamplingParams

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
BUDGETS = dict(question_tokens=32, chunk_tokens=32, memory_tokens=12, answer_tokens=6, chunks_per_segment=2)
FACTS = [
    ("Where is the red key?", "The red key is under the third stone.", "third stone"),
    ("Who keeps the lamp?", "The baker keeps the lamp near the mill.", "baker"),
    ("What colour is the gate?", "The gate near the pond is green.", "green"),
]
FILLER = "The quiet river stood near the old bridge in the morning. "


def eval_config(**overrides):
    from memagent_jax.configs import evaluate as evaluate_recipe

    cfg = evaluate_recipe.get_config("cpu")
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


def qa_records(mult: int, metric: str | None = None) -> list[QARecord]:
    """Questions whose answer sits in the middle of a filler document of about 25 * mult tokens."""
    out = []
    for i, (q, fact, a) in enumerate(FACTS):
        doc = FILLER * mult + fact + " " + FILLER * mult
        extra = {"num_docs": 2 * mult} | ({"metric": metric} if metric else {})
        out.append(QARecord(question=q, document=doc, answers=(a,), index=10 + i, extra=extra))
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    base = tmp_path_factory.mktemp("eval_models")
    return {
        "warm": make_agent_model_dir(base / "warm", variant="qwen2", seed=1),
        "rl": make_agent_model_dir(base / "rl", variant="qwen2", seed=2),
    }


@pytest.fixture(scope="module")
def eval_files(tmp_path_factory):
    base = tmp_path_factory.mktemp("eval_files")
    short, long = str(base / "qa_len_1x.jsonl"), str(base / "qa_len_4x.json")
    write_eval_file(qa_records(1), short)
    write_eval_file(qa_records(4, metric="string_match_all"), long)
    return [short, long]


# ------------------------------------------------------------------------------------------- statistics


def test_wilson_interval_hand_values():
    # 8/10: p = .8, z^2/n = .38416 -> centre .71674, half-width .22658
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    low, high = wilson_interval(0, 4)  # (0, z^2 / (n + z^2))
    assert low == 0.0 and high == pytest.approx(3.8416 / 7.8416, abs=1e-9)
    low, high = wilson_interval(10, 10)  # (n / (n + z^2), 1)
    assert low == pytest.approx(10 / 13.8416, abs=1e-9) and high == pytest.approx(1.0)
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


def test_normal_interval_hand_values():
    mean, low, high = normal_interval([0.2, 0.4, 0.6, 0.8])  # s = sqrt(0.2 / 3), half = 1.96 s / 2
    half = 1.96 * math.sqrt(0.2 / 3) / 2
    assert mean == pytest.approx(0.5) and low == pytest.approx(0.5 - half) and high == pytest.approx(0.5 + half)
    mean, low, high = normal_interval([0.0, 0.0, 0.0, 0.1])  # 0.025 - 0.049 < 0: clipped to the score range
    assert low == 0.0 and high == pytest.approx(0.025 + 1.96 * 0.05 / 2)
    assert normal_interval([0.0, 0.0, 0.0, 0.1], bounds=None)[1] == pytest.approx(0.025 - 0.049)
    assert normal_interval([0.3]) == (0.3, 0.0, 1.0)  # one value: no spread estimate


def _loop_summary(rows):
    """The aggregation written as plain loops over rows."""
    out = {}
    for name in SCORE_NAMES:
        values = [r[name] for r in rows]
        n = len(values)
        mean = sum(values) / n
        binary = all(v in (0.0, 1.0) for v in values)
        if name in ("em", "sub_em") or (name == "accuracy" and binary):
            p, z2 = mean, 1.96**2
            centre = (p + z2 / (2 * n)) / (1 + z2 / n)
            half = 1.96 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
            out[name] = (mean, max(0.0, centre - half), min(1.0, centre + half))
        else:
            s = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
            out[name] = (mean, max(0.0, mean - 1.96 * s / math.sqrt(n)), min(1.0, mean + 1.96 * s / math.sqrt(n)))
    return out


@pytest.mark.parametrize("metric", ["sub_em", "em", "f1", "string_match_all"])
def test_aggregation_equals_plain_loop(metric):
    rng = np.random.default_rng(0)
    words = ["paris", "the city of paris", "london", "new york", "york", "rome", ""]
    rows = []
    for _ in range(40):
        gold = [str(rng.choice(words[:-1])) for _ in range(int(rng.integers(1, 3)))]
        pred = str(rng.choice(words))
        response = f"I think \\boxed{{{pred}}}" if rng.random() < 0.8 else "no box here"
        scored = score_response(response, gold, metric)
        extracted = verifier.extract_prediction(response)
        assert scored["prediction"] == (None if extracted is None else extracted.strip())
        expect = {
            n: (verifier.METRICS[n](extracted, gold) if extracted is not None else 0.0) for n in ("em", "f1", "sub_em")
        }
        expect["accuracy"] = verifier.score(response, gold, metric)
        assert scored["scores"] == pytest.approx(expect)
        rows.append(scored["scores"])
    got = summarize(rows)
    want = _loop_summary(rows)
    for name in SCORE_NAMES:
        assert (got[name].mean, got[name].low, got[name].high) == pytest.approx(want[name], abs=1e-12), name
        assert got[name].n == 40
    assert got["f1"].method == "normal" and got["em"].method == "wilson"


def test_gold_prediction_scores_one():
    scored = score_response("The notes say it: \\boxed{The Third Stone}.", ["third stone"], "sub_em")
    assert scored["prediction"] == "The Third Stone"
    assert scored["scores"] == {"accuracy": 1.0, "em": 1.0, "f1": 1.0, "sub_em": 1.0}
    summary = summarize([scored["scores"]] * 5)
    assert summary["accuracy"].mean == 1.0 and summary["accuracy"].method == "wilson"
    assert summary["accuracy"].low == pytest.approx(5 / (5 + 1.96**2))


# ------------------------------------------------------------------------------------------- aggregation


class OracleAgent:
    """Stands in for MemoryAgent: answers \\boxed{gold} for the questions in `right`, else a wrong box; one
    'token' per word; records the keys it was given."""

    def __init__(self, golds, right):
        self.golds, self.right, self.keys, self.batches = golds, set(right), {}, []

    def prepare(self, question, document, *, source="row 0"):
        if not question.strip():
            raise AgentInputError(f"{source}: question: the question is empty")
        return np.zeros(3, np.int32), np.arange(len(document.split()), dtype=np.int32)

    def run(self, questions, documents, rng=0, *, trace=False, batch_size=None, progress=False):
        self.batches.append(len(questions) if batch_size is None else ("slots", batch_size, len(questions)))
        trace = any(trace) if isinstance(trace, list) else trace
        for q, key in zip(questions, rng):
            self.keys[q] = jax.random.key_data(key)
        answers = [f"\\boxed{{{self.golds[q]}}}" if q in self.right else "\\boxed{nothing}" for q in questions]
        return AgentResult(
            answers=answers,
            answer_ids=[[1]] * len(questions),
            finished=[True] * len(questions),
            num_chunks=[-(-d.size // 10) for d in documents],
            traces=[["note"] * -(-d.size // 10) for d in documents] if trace else None,
        )


def test_evaluate_agent_aggregates_rows_and_fixes_keys(tmp_path):
    records = qa_records(2) + [QARecord(question=" ", document="x y", answers=("z",), index=99, extra={"num_docs": 4})]
    golds = {q: a for q, _, a in FACTS}
    agent = OracleAgent(golds, right=[FACTS[0][0], FACTS[2][0]])
    r = evaluate_agent(agent, records, batch_size=2, num_traces=2, seed=5, progress=False, scheduling="bucketed")
    assert (r.n, r.skipped) == (3, 1) and r.accuracy.mean == pytest.approx(2 / 3) and r.em.mean == pytest.approx(2 / 3)
    assert agent.batches == [2, 2]  # the short last batch is padded to the full size (one compiled shape)
    agent.batches.clear()
    cont = evaluate_agent(agent, records, batch_size=2, num_traces=2, seed=5, progress=False)
    assert agent.batches == [("slots", 2, 3)]  # continuous: every runnable row through one engine of 2 slots
    assert [row.get("scores") for row in cont.rows] == [row.get("scores") for row in r.rows]
    assert (r.accuracy.low, r.accuracy.high) == pytest.approx(wilson_interval(2, 3))
    words = [len(rec.document.split()) for rec in records[:3]]
    assert r.mean_doc_tokens == pytest.approx(np.mean(words)) and r.total_doc_tokens == sum(words)
    assert r.mean_chunks == pytest.approx(np.mean([-(-w // 10) for w in words]))
    assert r.label == "4 docs" and r.metrics_used == {"sub_em": 3}
    assert [row["row"] for row in r.rows] == [0, 1, 2, 3] and "error" in r.rows[3]
    assert ["trace" in row for row in r.rows] == [True, True, False, False]
    assert r.rows[0]["prediction"] == "third stone" and r.rows[0]["scores"]["accuracy"] == 1.0
    for rec in records[:3]:  # key of a row = fold_in(key(seed), index), whatever its batch
        want = jax.random.key_data(jax.random.fold_in(jax.random.key(5), rec.index))
        np.testing.assert_array_equal(agent.keys[rec.question], want)
    zero = evaluate_agent(agent, records, row_errors="zero", progress=False)
    assert (zero.n, zero.skipped) == (4, 0) and zero.accuracy.mean == pytest.approx(2 / 4)
    assert zero.mean_doc_tokens == pytest.approx(np.mean(words))  # the failed row read no document
    with pytest.raises(AgentInputError, match="row 3: question: the question is empty"):
        evaluate_agent(agent, records, row_errors="raise", progress=False)
    short = evaluate_agent(agent, records, max_questions=2, progress=False)
    assert short.n == 2


def test_auto_metric_and_bad_rows_name_the_file(tmp_path, eval_files):
    golds = {q: a for q, _, a in FACTS}
    agent = OracleAgent(golds, right=list(golds))
    r = evaluate_agent(agent, eval_files[1], metric="auto", progress=False)
    assert r.metrics_used == {"string_match_all": 3} and r.accuracy.mean == 1.0 and r.label == "len_4x"
    bad = tmp_path / "bad_rows.jsonl"
    bad.write_text(
        json.dumps({"context": "a b", "input": "q?", "answers": ["a"]})
        + "\n"
        + json.dumps({"context": "a b", "input": "q?"})
        + "\n"
    )
    # A bad row is an error row naming file, row and field; the good row still counts (row_errors='raise' stops).
    kept = evaluate_agent(agent, str(bad), progress=False)
    assert (kept.n, kept.skipped, kept.errors) == (1, 1, 1)
    assert re.search(r"bad_rows\.jsonl row 1: field 'answers' is (missing|null)", kept.rows[1]["error"])
    assert kept.rows[1]["field"] == "answers" and "error" not in kept.rows[0]
    with pytest.raises(DataFormatError, match=r"bad_rows\.jsonl row 1: field 'answers' is (missing|null)"):
        evaluate_agent(agent, str(bad), progress=False, row_errors="raise")
    odd = tmp_path / "odd_metric.jsonl"
    odd.write_text(json.dumps({"context": "a b", "input": "q?", "answers": ["a"], "metric": "bleu"}) + "\n")
    with pytest.raises(EvalConfigError, match=r"odd_metric\.jsonl row 0: field 'metric' names an unknown metric"):
        evaluate_agent(agent, str(odd), metric="auto", progress=False, row_errors="raise")
    assert "names an unknown metric" in evaluate_agent(agent, str(odd), metric="auto", progress=False).rows[0]["error"]


def test_labels_and_model_specs(tmp_path):
    assert length_label("/d/qa_len_4x.jsonl") == "len_4x"
    assert length_label("/d/eval_800docs.json") == "800 docs"
    assert length_label("/d/hotpot_28k.parquet") == "28k"
    recs = [
        QARecord("q", "d", ("a",), extra={"num_tokens": 7000}),
        QARecord("q", "d", ("a",), extra={"num_tokens": 7400}),
    ]
    assert length_label("/d/needles.jsonl", recs) == "7.2K tok"
    assert length_label("/d/plain.jsonl", [QARecord("q", "d", ("a",))]) == "plain"
    folder = tmp_path / "ckpt" / "rl_final"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    assert parse_models(f"a={folder}, {folder}/") == [("a", str(folder)), ("rl_final", f"{folder}/")]
    with pytest.raises(EvalConfigError, match="two models are named 'x'"):
        parse_models([("x", str(folder)), ("x", str(folder))])


# ------------------------------------------------------------------------------------------- end to end


def _main(*args):
    """The CLI in this process: `main` with --config / --workdir parsed on a private FlagValues (the global flags
    may hold memagent_jax.train's flags of the same names)."""
    from absl import flags

    argv = ["evaluate", "--config", os.path.join(REPO, "configs", "evaluate.py") + ":cpu", *args]
    fv = flags.FlagValues()
    ev.define_flags(fv, sys_argv=argv)
    fv(argv)
    ev.main(["evaluate"])


def test_cli_end_to_end_two_models_two_lengths(models, eval_files, tmp_path, capsys):
    workdir = tmp_path / "eval"
    pattern = os.path.join(os.path.dirname(eval_files[0]), "qa_len_*")
    overrides = [f"--config.agent.{k}={v}" for k, v in BUDGETS.items()]
    _main(
        "--workdir",
        str(workdir),
        f"--config.models=warm={models['warm']},{models['rl']}",
        f"--config.eval_files={pattern}",
        "--config.agent.temperature=0",
        "--config.metric=auto",
        "--config.batch_size=4",
        "--config.num_traces=2",
        *overrides,
    )
    out, err = capsys.readouterr()
    print(out)
    for name in ("results.json", "results.csv", "results.txt", "accuracy_vs_length.png"):
        assert (workdir / name).stat().st_size > 0, name
    assert (workdir / "accuracy_vs_length.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "accuracy % [95% CI]" in out and "len_4x" in out
    assert "warm / qa_len_4x" in err  # progress

    with open(workdir / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [(r["model"], r["label"]) for r in table] == [
        ("warm", "len_1x"),
        ("warm", "len_4x"),
        ("rl", "len_1x"),
        ("rl", "len_4x"),
    ]
    for r in table:
        for name in SCORE_NAMES:
            assert 0.0 <= float(r[f"{name}_low"]) <= float(r[name]) <= float(r[f"{name}_high"]) <= 1.0
        assert int(r["n"]) == 3 and float(r["mean_doc_tokens"]) > 0 and float(r["mean_chunks"]) >= 1
    short, long = float(table[0]["mean_doc_tokens"]), float(table[1]["mean_doc_tokens"])
    assert 2.5 * short < long  # the x axis is the measured length

    summary = json.loads((workdir / "results.json").read_text())
    assert summary["config"]["cli_config"]["metric"] == "auto"
    assert summary["config"]["models"] == {"warm": models["warm"], "rl": models["rl"]}
    assert [r["metrics_used"] for r in summary["results"][:2]] == [{"sub_em": 3}, {"string_match_all": 3}]
    assert summary["results"][0]["accuracy"]["method"] in ("wilson", "normal")

    # Greedy evaluation = MemoryAgent.run on the same rows (same mesh as the CLI's default: fsdp over all devices).
    from transformers import AutoTokenizer

    mesh = make_mesh(1, -1, 1)
    params, config = load_hf_params(models["warm"], mesh=mesh, param_dtype="float32")
    agent = MemoryAgent(
        params,
        config,
        AutoTokenizer.from_pretrained(models["warm"], local_files_only=True),
        budgets=AgentBudgets(**BUDGETS),
        mesh=mesh,
        memory_sampling=SamplingParams(temperature=0.0, top_p=0.95),
    )
    for path in eval_files:
        records = list(open_file(path))
        direct = agent.run([r.question for r in records], [r.document for r in records], rng=0, trace=True)
        stem = os.path.splitext(os.path.basename(path))[0]
        rows = [json.loads(line) for line in (workdir / "predictions" / f"warm__{stem}.jsonl").read_text().splitlines()]
        assert [r["index"] for r in rows] == [r.index for r in records]
        assert [r["response"] for r in rows] == direct.answers
        assert [r["prediction"] for r in rows] == [verifier.readable_answer(a) for a in direct.answers]
        assert [r["num_chunks"] for r in rows] == direct.num_chunks
        assert [r.get("trace") for r in rows] == direct.traces[:2] + [None]
        for row in rows:
            assert set(row["scores"]) == set(SCORE_NAMES) and row["answers"]


def test_cli_program_errors_exit_2(models, tmp_path):
    """`python -m memagent_jax.evaluate` itself: flags, the name=folder list through config_flags, exit code 2."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "memagent_jax.evaluate",
            "--config",
            "configs/evaluate.py:cpu",
            "--workdir",
            str(tmp_path / "w"),
            f"--config.models=a={models['warm']},b={tmp_path}",
            "--config.eval_files=" + str(tmp_path / "x.jsonl"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"error: config.models: model 'b' folder '{tmp_path}' has no config.json" in proc.stderr


def test_cli_data_errors_exit_2(models, tmp_path, capsys):
    train = tmp_path / "train_rows.jsonl"
    write_train_file(qa_records(1), train)
    with pytest.raises(SystemExit) as exit_info:
        _main("--workdir", str(tmp_path / "w"), f"--config.models={models['warm']}", f"--config.eval_files={train}")
    assert exit_info.value.code == 2
    assert "train_rows.jsonl: was opened as 'eval' data" in capsys.readouterr().err


# (field overrides given the working `ok` settings and tmp_path, the message naming the field)
CONFIG_ERRORS = {
    "no models": (lambda ok, t: dict(ok, models=""), r"config\.models: no models given"),
    "folder without config": (
        lambda ok, t: dict(ok, models=f"a={_empty_folder(t)}"),
        r"config\.models: model 'a' folder .*no_config' has no config\.json",
    ),
    "missing folder": (
        lambda ok, t: dict(ok, models=f"a={t / 'gone'}"),
        r"config\.models: model 'a' folder .*gone' does not exist",
    ),
    "missing file": (
        lambda ok, t: dict(ok, eval_files=str(t / "nope.jsonl")),
        r"config\.eval_files: evaluation file .*nope\.jsonl' does not exist",
    ),
    "empty pattern": (
        lambda ok, t: dict(ok, eval_files=str(t / "none_*.jsonl")),
        r"config\.eval_files: pattern .* matches no file",
    ),
    "metric": (lambda ok, t: dict(ok, metric="bleu"), r"config\.metric: unknown metric 'bleu'"),
    "row errors": (lambda ok, t: dict(ok, row_errors="ignore"), r"config\.row_errors"),
    "chunk tokens": (
        lambda ok, t: {**ok, "agent.chunk_tokens": 0},
        r"config\.agent\.chunk_tokens must be an integer > 0, got 0",
    ),
    "top p": (lambda ok, t: {**ok, "agent.top_p": 1.5}, r"config\.agent\.top_p must be a finite number in \(0, 1\]"),
    "prompt mode": (lambda ok, t: {**ok, "agent.prompt_mode": "words"}, r"config\.agent: prompt_mode must be one of"),
    "mesh": (lambda ok, t: {**ok, "mesh.data": 3}, r"config\.mesh: .*8 devices"),
    "attention": (lambda ok, t: dict(ok, attention_impl="flash"), r"config\.attention_impl: must be one of"),
}


def _empty_folder(tmp_path):
    folder = tmp_path / "no_config"
    folder.mkdir(exist_ok=True)
    return folder


@pytest.mark.parametrize("case", list(CONFIG_ERRORS))
def test_config_errors_name_the_field(case, models, eval_files, tmp_path):
    ok = dict(models=models["warm"], eval_files=",".join(eval_files))
    overrides, pattern = CONFIG_ERRORS[case]
    with pytest.raises(EvalConfigError, match=pattern):
        ev.run(eval_config(**overrides(ok, tmp_path)), str(tmp_path / "w"))


def test_a_training_file_or_no_models_is_refused(models, eval_files, tmp_path):
    ok = dict(models=models["warm"], eval_files=",".join(eval_files))
    train = tmp_path / "train_rows.jsonl"
    write_train_file(qa_records(1), train)
    with pytest.raises(DataFormatError, match=r"train_rows\.jsonl: .*'eval'"):
        ev.run(eval_config(**dict(ok, eval_files=str(train))), str(tmp_path / "w"))
    with pytest.raises(EvalConfigError, match="models: no models given"):
        evaluate_models({}, eval_files, None)


# ------------------------------------------------------------------------------------------- averaging


def _row(response, score):
    return {"response": response, "scores": {"accuracy": score, "em": 0.0, "f1": score, "sub_em": 0.0}}


def test_reference_averaging_leaves_out_empty_responses_and_rounds_each_row():
    third = 1 / 3
    rows = [_row("\\boxed{a b c}", third)] * 3 + [_row("", 0.0)]
    ours = summarize_rows(rows, "ours")
    assert ours["accuracy"].n == 4 and ours["accuracy"].mean == pytest.approx(0.25, abs=1e-12)
    assert ours["f1"].mean == pytest.approx(0.25, abs=1e-12)
    ref = summarize_rows(rows, "reference")
    assert ref["accuracy"].n == 3 and ref["accuracy"].mean == pytest.approx(0.33, abs=1e-12)  # not 0.3333
    assert ref["f1"].mean == pytest.approx(0.33, abs=1e-12) and ref["em"].method == "wilson"
    assert summarize_rows(rows[:3], "ours")["accuracy"].mean == pytest.approx(third, abs=1e-12)
    # Only the empty string is left out (a blank response is a response); Python's round: 0.125 -> 0.12
    assert summarize_rows([_row(" ", 0.125), _row("x", 0.5)], "reference")["accuracy"].mean == pytest.approx(0.31)
    assert averaged_rows([_row("x", 2 / 3)], "reference") == [{"accuracy": 0.67, "em": 0.0, "f1": 0.67, "sub_em": 0.0}]


class ScriptedAgent(OracleAgent):
    """OracleAgent answering each question with a fixed response."""

    def __init__(self, responses):
        super().__init__({}, [])
        self.responses = responses

    def run(self, questions, documents, rng=0, *, trace=False, batch_size=None, progress=False):
        out = super().run(questions, documents, rng, trace=trace, batch_size=batch_size, progress=progress)
        return AgentResult(
            answers=[self.responses[q] for q in questions],
            answer_ids=out.answer_ids,
            finished=out.finished,
            num_chunks=out.num_chunks,
            traces=out.traces,
        )


def _scripted_agent():
    # F1 against the gold: precision 2/4 (1/2), recall 1 -> 2/3 (0.67 rounded); the last row answers nothing
    (q0, _, _), (q1, _, _), (q2, _, _) = FACTS
    return ScriptedAgent({q0: "\\boxed{third stone big tablet}", q1: "\\boxed{baker big}", q2: ""})


def test_evaluate_agent_averaging_reference_vs_ours():
    records = qa_records(1)
    ours = evaluate_agent(_scripted_agent(), records, metric="f1", progress=False)
    assert (ours.n, ours.empty, ours.averaging) == (3, 0, "ours")
    assert ours.accuracy.mean == pytest.approx((2 / 3 + 2 / 3 + 0) / 3, abs=1e-12)
    ref = evaluate_agent(_scripted_agent(), records, metric="f1", progress=False, averaging="reference")
    assert (ref.n, ref.empty, ref.averaging) == (2, 1, "reference")
    assert ref.accuracy.mean == pytest.approx(0.67, abs=1e-12) and ref.f1.mean == pytest.approx(0.67, abs=1e-12)
    assert ref.sub_em.mean == 1.0 and ref.em.mean == 0.0
    assert [row["scores"]["f1"] for row in ref.rows] == pytest.approx([2 / 3, 2 / 3, 0.0])  # rows stay unrounded
    assert "(+1 empty)" in format_table([ref])
    with pytest.raises(EvalConfigError, match=r"^averaging must be one of \['ours', 'reference'\], got 'mean'$"):
        evaluate_agent(_scripted_agent(), records, progress=False, averaging="mean")


def test_results_json_records_the_averaging(tmp_path, monkeypatch):
    from memagent_jax.evaluation import loop

    monkeypatch.setattr(loop, "_agent_for", lambda source, **kw: (_scripted_agent(), ""))
    file = str(tmp_path / "qa_len_1x.jsonl")
    write_eval_file(qa_records(1), file)
    out = tmp_path / "out"
    results = evaluate_models(
        {"m": (None, None, None)},
        [file],
        str(out),
        metric="f1",
        averaging="reference",
        progress=False,
        plot=False,
        warmup=False,
    )
    assert results.results[0].accuracy.mean == pytest.approx(0.67)
    saved = json.loads((out / "results.json").read_text())
    assert saved["config"]["averaging"] == "reference"
    assert (saved["results"][0]["averaging"], saved["results"][0]["empty"], saved["results"][0]["n"]) == (
        "reference",
        1,
        2,
    )
    with pytest.raises(EvalConfigError, match=r"^averaging must be one of"):
        evaluate_models({"m": (None, None, None)}, [file], None, averaging="Reference", progress=False)


def _cli_inputs(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    file = str(tmp_path / "qa_len_1x.jsonl")
    write_eval_file(qa_records(1), file)
    return dict(models=str(folder), eval_files=file)


def test_config_averaging_is_checked_by_the_settings_rules(tmp_path):
    from memagent_jax.configs import evaluate as evaluate_recipe

    ok = _cli_inputs(tmp_path)
    assert eval_config().averaging == "ours" and evaluate_recipe.get_config().averaging == "ours"
    ev.validate_config(eval_config(**ok, averaging="reference"))
    for bad in ("mean", "", "Reference"):
        with pytest.raises(
            EvalConfigError, match=rf"^config\.averaging must be one of \['ours', 'reference'\], got '{bad}'$"
        ):
            ev.validate_config(eval_config(**ok, averaging=bad))
