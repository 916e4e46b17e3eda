"""The README's "Python API" block, run as written from a folder holding `runs/tiny_synthetic` as `make demo` leaves
it: the export (with memagent_agent.json beside it, as train's export writes it) and the evaluation files.

- Against a tiny random model and one hand-written row in the task's wording, the block runs and prints what it
  says it prints.
- Against a model trained by the main job's own stages (slow), the block answers its held-out question right.
"""

import json
import os
import re

import pytest

from hf_tiny import make_agent_model_dir
from memagent_jax.agent import AgentBudgets, AgentTemplates, write_agent_settings
from memagent_jax.evaluation.verifier import readable_answer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")

# One held-out row in the main job's wording: "Remember <creature> <Word>." facts, the asked one among look-alikes,
# in a haystack of plain sentences.
ROW = {
    "context": " A child worked around the tower. Remember badger Ra. Remember bison Rin. The distant market lay"
    " past the roof. Every winter the dusty boat waited behind a road. Remember osprey Zor. Nothing"
    " changed at the garden that spring. Remember heron Mi.",
    "input": "What is the secret word for badger?",
    "answers": ["Ra"],
    "index": 0,
}


def _api_block() -> str:
    text = open(README, encoding="utf-8").read()
    section = text[text.index("## Python API") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _run_block(folder, capsys) -> tuple[list[str], dict]:
    """Exec the README block with the working directory at `folder`; its printed lines and its variables."""
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        scope: dict = {}
        exec(compile(_api_block(), "README.md#python-api", "exec"), scope)
    finally:
        os.chdir(cwd)
    return capsys.readouterr().out.splitlines(), scope


def _check_printed_line(line: str, scope: dict) -> str:
    """The block's answer line, `question 'extracted' (gold 'answer', N chunks read)`; returns the extracted answer."""
    row, result = scope["row"], scope["result"]
    extracted = readable_answer(result.answers[0])  # the settings' rule: 'boxed'
    assert scope["answer"] == result.predictions[0] == extracted
    assert line == f"{row.question} {extracted!r} (gold {row.answers[0]!r}, {len(result.traces[0])} chunks read)"
    assert len(result.traces[0]) == result.num_chunks[0] >= 2
    return extracted


def test_readme_api_block_runs_as_written(tmp_path, capsys):
    run = tmp_path / "runs" / "tiny_synthetic"
    folder = run / "rl" / "export"
    make_agent_model_dir(folder, variant="qwen2", seed=4)
    budgets = AgentBudgets(question_tokens=32, chunk_tokens=24, memory_tokens=16, answer_tokens=6, chunks_per_segment=2)
    write_agent_settings(folder, budgets=budgets, templates=AgentTemplates(), temperature=0.7, top_p=0.95)
    (run / "assets").mkdir()
    (run / "assets" / "eval_4x.jsonl").write_text(json.dumps(ROW) + "\n", encoding="utf-8")

    out, scope = _run_block(tmp_path, capsys)
    assert out[0] == "24 0.7"  # the settings file's chunk budget and sampling
    assert scope["row"].question == ROW["input"] and list(scope["row"].answers) == ["Ra"]
    _check_printed_line(out[1], scope)
    assert scope["greedy"].budgets.chunks_per_segment == 4 and scope["greedy"].settings.temperature == 0.0


def _main_job_config():
    """The quick variant with the main job's own warm start."""
    from memagent_jax.configs import tiny_synthetic

    cfg = tiny_synthetic.get_config("quick")
    cfg.warm_start = tiny_synthetic.get_config().warm_start
    return cfg


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """The main job with its own warm start (384 SFT updates of 16 scripted trajectories) and the quick variant's
    other stages (a short GRPO run, 32 questions per evaluation file): a model that answers most held-out
    questions at 4x, in the folder layout `make demo` writes."""
    from memagent_jax import pipeline

    cfg = _main_job_config()
    workdir = tmp_path_factory.mktemp("trained") / "tiny_synthetic"
    summary = pipeline.run(cfg, str(workdir))
    return workdir, summary


@pytest.mark.slow
def test_readme_api_block_answers_its_question_right(trained_run, tmp_path, capsys):
    workdir, summary = trained_run
    assert summary["results"]["RL"]["4x"]["accuracy"] >= 0.6  # the fixture's model has learned the task
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "tiny_synthetic").symlink_to(workdir, target_is_directory=True)

    out, scope = _run_block(tmp_path, capsys)
    assert out[0] == "32 0.7"  # the main job's chunk budget and the export's evaluation sampling
    row = scope["row"]
    assert re.fullmatch(r"What is the secret word for \w+\?", row.question)
    creature = row.question[len("What is the secret word for ") : -1]
    assert f"Remember {creature} {row.answers[0]}." in row.document  # the asked fact, in the task's wording
    extracted = _check_printed_line(out[1], scope)
    assert extracted == row.answers[0]  # the right answer
