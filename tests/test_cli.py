"""The `memagent` command: every subcommand answers --help, config-driven ones print their fields, build-data
dispatches to the builders; `python -m memagent_jax.plan --help` works; object-store workdirs are refused up front;
`import memagent_jax` stays light and exports the notebook names."""

import os
import re
import subprocess
import sys

import pytest

from memagent_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("command", ["demo", "train", "evaluate", "answer", "generate", "serve", "plan", "build-data"])
def test_every_subcommand_answers_help(command, capsys):
    try:
        code = cli.main([command, "--help"])
    except SystemExit as e:  # argparse's --help
        code = e.code
    out = capsys.readouterr().out
    assert code == 0 and len(out) > 200 if command != "build-data" else code == 0 and "hotpotqa" in out
    if command in ("answer",):
        assert "--agent.chunk_tokens" in out and "else 5000" in out  # the config name, its default
    if command in ("train", "evaluate", "demo"):
        assert "--print-config" in out
    if command == "serve":  # its own document limit (413), the agent's centre truncation under its config name
        assert "--max-document-tokens" in out and "--agent.max_document_tokens" in out and "<<<DOCUMENT>>>" in out


def test_top_level_usage_and_unknown_command(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in cli.COMMANDS)
    assert cli.main(["fly"]) == 2 and "unknown command 'fly'" in capsys.readouterr().err


def test_print_config_shows_values_after_overrides_and_docs(capsys):
    grpo = os.path.join(REPO, "configs", "grpo.py")
    assert cli.main(["train", "--config", f"{grpo}:cpu", "--config.steps=7", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^steps = 7$", out, re.M)
    assert re.search(r"^agent\.chunk_tokens = 32  # document tokens read per step$", out, re.M)
    assert re.search(r"^model\.path = ''  # local Hugging Face folder", out, re.M)
    # The recipe configs build on grpo.py: its descriptions carry over.
    recipe = os.path.join(REPO, "configs", "qwen2_5_7b_hotpotqa.py")
    assert cli.main(["plan", "--config", f"{recipe}:8xh100", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^agent\.chunk_tokens = 5000  # document tokens read per step$", out, re.M)
    assert cli.main(["evaluate", "--config", os.path.join(REPO, "configs", "evaluate.py"), "--print-config"]) == 0
    assert re.search(
        r"^agent\.chunk_tokens = None  # document tokens read per step \| 5000$", capsys.readouterr().out, re.M
    )
    assert cli.main(["answer", "--print-config"]) == 2


def test_build_data_dispatches_to_the_builders(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["build-data", "squad", "--help"])
    assert e.value.code == 0 and "memagent_jax.data.squad" in capsys.readouterr().out
    assert cli.main(["build-data", "wiki"]) == 2 and "unknown source 'wiki'" in capsys.readouterr().err
    missing = tmp_path / "none.json"
    assert cli.main(["build-data", "hotpotqa", "--input", str(missing), "--out_dir", str(tmp_path / "o")]) == 2


def test_plan_module_help_and_bad_hardware():
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    run = subprocess.run(
        [sys.executable, "-m", "memagent_jax.plan", "--help"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0 and "--doc_tokens" in run.stdout and "Capacity planner" in run.stdout
    run = subprocess.run(
        [sys.executable, "-m", "memagent_jax.plan", "--config", "configs/qwen2_5_7b_hotpotqa.py:8xh200"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "unknown hardware '8xh200'" in run.stderr and "8xh100" in run.stderr


def test_object_store_workdirs_are_refused_up_front(tmp_path):
    from memagent_jax import answer
    from memagent_jax.rl.recipe import TrainConfigError
    from memagent_jax.rl.trainer import train
    from memagent_jax.storage.paths import RemotePathError, check_local_path

    check_local_path(str(tmp_path / "run"), "--workdir")  # local paths pass
    with pytest.raises(RemotePathError, match=r"--workdir: 'gs://b/run' is a gs:// URL.*mount"):
        check_local_path("gs://b/run", "--workdir")
    with pytest.raises(TrainConfigError, match=r"--workdir: 's3://b/x' is a s3:// URL"):
        train(None, "s3://b/x")  # refused before the config is even looked at
    args = answer._parser().parse_args(["--model", str(tmp_path), "--input", "x", "--output", "gs://b/o.jsonl"])
    with pytest.raises(answer.FlagError, match=r"--output: 'gs://b/o.jsonl' is a gs:// URL"):
        answer.check_args(args)


def test_package_exports_load_lazily():
    code = (
        "import sys, memagent_jax; assert 'jax' not in sys.modules, 'import memagent_jax pulled in jax'; "
        "from memagent_jax import MemoryAgent, load_hf_params, SamplingParams, AgentSettings, evaluate_models; "
        "assert hasattr(MemoryAgent, 'from_pretrained'); print('ok')"
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=REPO),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]
    import memagent_jax

    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        memagent_jax.Nope
