"""The JAX chunk scan (a batch of rows at once) against an independent greedy loop in transformers/torch."""

import collections

import numpy as np
import pytest

from hf_tiny import make_agent_model_dir
from memagent_jax.agent import AgentBudgets, MemoryAgent
from memagent_jax.agent.runner import default_stop_ids
from memagent_jax.agent.torch_loop import TorchAgentResult, load_torch_model, torch_agent_run, torch_stop_ids
from memagent_jax.data.tokenizer import load_tokenizer
from memagent_jax.models import load_hf_params

BUDGETS = AgentBudgets(question_tokens=24, chunk_tokens=16, memory_tokens=12, answer_tokens=6, chunks_per_segment=2)
QUESTIONS = ["Where is the key?", "Which river flows past the old mill?", "Name it.", "What is the code?"]
TEXT = "The key is under the blue stone by the old mill. The river is quiet."


def documents(tokenizer):
    """Row 0 as text (34 tokens, tokenized by both sides: 3 chunks of 16, the last of 2 tokens), the rest as
    ids: 1 partial chunk, 2 full chunks, 4 chunks with a partial last one."""
    rng = np.random.default_rng(0)
    return [TEXT] + [rng.integers(3, len(tokenizer), n).astype(np.int32) for n in (9, 32, 57)]


@pytest.fixture(scope="module", params=["qwen2", "llama3"])
def setup(request, tmp_path_factory):
    folder = make_agent_model_dir(
        tmp_path_factory.mktemp(request.param) / "model", request.param, seed=3, vocab_size=400
    )
    tokenizer = load_tokenizer(folder)
    params, config = load_hf_params(folder)
    return dict(
        variant=request.param,
        folder=folder,
        tokenizer=tokenizer,
        model=load_torch_model(folder),
        params=params,
        config=config,
    )


def check_rows(agent, setup, docs, stop_token_ids):
    """Runs every row on the JAX side at once and one by one in torch; everything must agree."""
    tok, model = setup["tokenizer"], setup["model"]
    result = agent.run(QUESTIONS, docs, rng=0, trace=True, record=True)
    assert result.num_chunks == [3, 1, 2, 4]
    outs = []
    for row, (q, d) in enumerate(zip(QUESTIONS, docs)):
        out = torch_agent_run(model, tok, q, d, budgets=BUDGETS, stop_token_ids=stop_token_ids)
        assert isinstance(out, TorchAgentResult)
        convs = result.conversations[row]
        memory_convs = [c for c in convs if c.kind == "memory"]
        assert len(out.memories) == len(memory_convs) == result.num_chunks[row]
        assert [c.prompt_ids.tolist() for c in memory_convs] == out.prompt_ids, row
        assert [c.response_ids.tolist() for c in memory_convs] == out.response_ids, row
        assert result.traces[row] == out.memories, row
        assert out.memories == [tok.decode(m, skip_special_tokens=True) for m in out.memory_ids]
        assert convs[-1].prompt_ids.tolist() == out.final_prompt_ids, row
        assert result.answer_ids[row] == out.answer_ids, row
        assert result.answers[row] == out.answer, row
        assert result.finished[row] == out.finished, row
        outs.append(out)
    return result, outs


def _paths(outs, stops):
    pairs = [(r, m) for o in outs for r, m in zip(o.response_ids, o.memory_ids)]
    stopped = [(r, m) for r, m in pairs if r[-1] in stops]
    cut = [(r, m) for r, m in pairs if r[-1] not in stops]
    return stopped, cut


def pick_stop_token(setup, docs) -> int:
    """A token that makes some greedy memory updates end early on it while others still run to the budget
    (tried on the torch loop, most frequent response tokens first)."""

    def run(stops):
        return [
            torch_agent_run(setup["model"], setup["tokenizer"], q, d, budgets=BUDGETS, stop_token_ids=stops)
            for q, d in zip(QUESTIONS, docs)
        ]

    outs = run(None)
    responses = [set(r) for o in outs for r in o.response_ids]
    counts = collections.Counter(t for r in responses for t in r)
    for _, token in sorted(((n, -t) for t, n in counts.items() if n < len(responses)), reverse=True)[:12]:
        stopped, cut = _paths(run((2, -token)), (2, -token))
        if stopped and cut:
            return -token
    raise AssertionError("no token splits the memory updates into stopped and cut ones")


def test_jax_agent_equals_torch_loop(setup):
    """One batch of 4 rows (1..4 chunks, partial last chunks) on the JAX side vs the torch loop row by row:
    every prompt, response, carried memory, trace and answer agree, and both ways a memory update can end
    are exercised: a stop token (stripped from the carried memory, kept in the response) and the budget
    (all M ids carried)."""
    tok = setup["tokenizer"]
    docs = documents(tok)
    stops = (2, pick_stop_token(setup, docs))
    agent = MemoryAgent(setup["params"], setup["config"], tok, budgets=BUDGETS, stop_token_ids=stops)
    _, outs = check_rows(agent, setup, docs, stops)
    stopped, cut = _paths(outs, stops)
    assert stopped and all(m == r[:-1] for r, m in stopped)  # the stop path was exercised
    assert cut and all(len(r) == BUDGETS.memory_tokens and m == r for r, m in cut)  # and the budget path


def test_default_stop_ids_agree(setup):
    """torch_agent_run(stop_token_ids=None) stops where MemoryAgent does by default."""
    assert torch_stop_ids(setup["model"], setup["tokenizer"]) == default_stop_ids(setup["tokenizer"], setup["config"])
    assert 2 in torch_stop_ids(setup["model"], setup["tokenizer"])  # <|im_end|>


def test_load_torch_model_needs_safetensors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_torch_model(tmp_path / "missing")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no .safetensors"):
        load_torch_model(tmp_path)
