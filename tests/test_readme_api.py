"""The README's "Python API" block runs as written, against an export at the path it names (a tiny model built here
with memagent_agent.json beside it, as train's export writes it)."""

import os
import re

from hf_tiny import make_agent_model_dir
from memagent_jax.agent import AgentBudgets, AgentTemplates, write_agent_settings

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _api_block() -> str:
    text = open(README, encoding="utf-8").read()
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_api_block_runs_as_written(tmp_path, monkeypatch, capsys):
    code = _api_block()
    folder = tmp_path / "runs" / "tiny_synthetic" / "rl" / "export"
    make_agent_model_dir(folder, variant="qwen2", seed=4)
    budgets = AgentBudgets(question_tokens=32, chunk_tokens=24, memory_tokens=16, answer_tokens=6,
                           chunks_per_segment=2)
    write_agent_settings(folder, budgets=budgets, templates=AgentTemplates(), temperature=0.7, top_p=0.95)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md#python-api", "exec"), scope)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "24 0.7"  # the settings file's chunk budget and sampling
    assert int(out[1].rsplit(" ", 1)[1]) == scope["result"].num_chunks[0] >= 2
    assert scope["greedy"].budgets.chunks_per_segment == 4 and scope["greedy"].settings.temperature == 0.0
