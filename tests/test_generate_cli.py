"""`python -m memagent_jax.generate`: loads an HF folder + tokenizer, applies the chat template, prints completions."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

from hf_tiny import make_hf_model, save_hf_model
from memagent_jax import generate as cli
from memagent_jax.data.tokenizer import train_tokenizer

TEXTS = [
    "the river runs past the old mill",
    "a small boat drifts down the river at noon",
    "what is the name of the mill? the mill is called Alder",
    "numbers like 12 and 345 are split",
] * 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random qwen2 model folder with a trained byte-level tokenizer (ids 0 pad, 1 turn start, 2 EOS)."""
    folder = tmp_path_factory.mktemp("cli") / "model"
    train_tokenizer(TEXTS, folder, vocab_size=300)
    tok = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model = make_hf_model("qwen2", seed=3, vocab_size=len(tok))
    save_hf_model(model, str(folder))
    return str(folder), tok, model


def hf_greedy_text(model, tok, ids, n):
    cfg = transformers.GenerationConfig(
        do_sample=False, max_new_tokens=n, min_new_tokens=0, eos_token_id=[2], pad_token_id=0
    )
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), generation_config=cfg)[0, len(ids) :].tolist()
    if out and out[-1] == 2:
        out = out[:-1]
    return tok.decode(out, skip_special_tokens=False)


def test_chat_completion_matches_transformers(model_dir, capsys):
    folder, tok, model = model_dir
    rc = cli.main(
        ["--model", folder, "--prompt", "what is the name of the mill?", "--chat", "--max-new-tokens", "9", "--quiet"]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "what is the name of the mill?"}], add_generation_prompt=True, tokenize=False
    )
    assert rendered.startswith("<|im_start|>user\n") and rendered.endswith("<|im_start|>assistant\n")
    ids = tok.encode(rendered, add_special_tokens=False)
    assert printed == hf_greedy_text(model, tok, ids, 9) + "\n"


def test_batch_json_and_sampling(model_dir, capsys):
    folder, tok, _ = model_dir
    argv = [
        "--model",
        folder,
        "--prompt",
        "the river",
        "--prompt",
        "a small boat drifts",
        "--json",
        "--max-new-tokens",
        "6",
        "--temperature",
        "0.8",
        "--top-p",
        "0.9",
        "--top-k",
        "50",
        "--seed",
        "5",
    ]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]
    assert [r["prompt"] for r in rows] == ["the river", "a small boat drifts"]
    for r in rows:
        assert 1 <= len(r["token_ids"]) <= 6 and len(r["logprobs"]) == len(r["token_ids"])
        assert all(lp <= 0 for lp in r["logprobs"])
        assert r["finished"] == (r["token_ids"][-1] == 2)
    assert "new tokens for 2 prompt(s)" in captured.err
    assert cli.main(argv) == 0  # same seed: same output
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == rows


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--top-p", "1.5"], "--top-p must be a finite number in (0, 1] (1 = off), got 1.5"),
        (["--top-p", "0"], "--top-p must be a finite number in (0, 1] (1 = off), got 0.0"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be an integer > 0, got 0"),
        (["--temperature", "-1"], "--temperature must be"),
        (["--top-k", "-2"], "--top-k must be"),
        (["--system", "be brief"], "--system needs --chat"),
    ],
)
def test_bad_arguments(model_dir, capsys, extra, message):
    folder, _, _ = model_dir
    with pytest.raises(SystemExit) as exc:
        cli.main(["--model", folder, "--prompt", "hi"] + extra)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_folders(model_dir, tmp_path, capsys):
    folder, _, _ = model_dir
    with pytest.raises(SystemExit):
        cli.main(["--model", str(tmp_path / "nope"), "--prompt", "hi"])
    assert "no such folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        cli.main(["--model", str(tmp_path / "empty"), "--prompt", "hi"])
    assert "config.json is missing" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a tokenizer folder without a chat template
        notemplate = tmp_path / "tok"
        tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        tok.chat_template = None
        tok.save_pretrained(str(notemplate))
        for name in os.listdir(notemplate):
            if name.startswith("chat_template"):
                os.remove(notemplate / name)
        cli.main(["--model", folder, "--tokenizer", str(notemplate), "--prompt", "hi", "--chat"])
    assert "no chat template" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--model", folder, "--prompt", ""])
    assert "empty after tokenization" in capsys.readouterr().err


def test_module_entry_point(model_dir):
    folder, tok, model = model_dir
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(cli.__file__)))] + sys.path),
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "memagent_jax.generate",
            "--model",
            folder,
            "--prompt",
            "the river",
            "--max-new-tokens",
            "4",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    ids = tok.encode("the river", add_special_tokens=True)
    assert proc.stdout == hf_greedy_text(model, tok, ids, 4) + "\n"
    assert np.all([s in proc.stderr for s in ("new tokens", "prompt bucket 16")])
