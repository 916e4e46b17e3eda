"""Scripted warm-start trajectories (memagent_jax.rl.warm_start): exact agent prompts, the script's behaviour."""

import numpy as np
import pytest

from hf_tiny import task_tokenizer_and_prompts
from memagent_jax.agent import AgentBudgets, AgentTemplates
from memagent_jax.agent.chunking import tokenize_document
from memagent_jax.agent.templates import encode_text
from memagent_jax.data.synthetic import SyntheticConfig, generate_sample
from memagent_jax.rl.warm_start import ScriptedPolicy, conversations_to_sft_batch, scripted_conversations

BUDGETS = AgentBudgets(question_tokens=16, chunk_tokens=32, memory_tokens=8, answer_tokens=12, chunks_per_segment=2)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return task_tokenizer_and_prompts(tmp_path_factory.mktemp("tok"))


def run(setup, policy, index, chunks=6, distractors=0, seed=0):
    tok, prompts = setup
    cfg = SyntheticConfig(
        "keyed_recall", num_tokens=32 * chunks, num_distractors=distractors, chunk_tokens=32, chunk_aligned=True
    )
    sample = generate_sample(cfg, index, tok)
    ids = tokenize_document(tok, sample.text())
    return (
        sample,
        ids,
        scripted_conversations(
            sample, ids, tok, prompts, BUDGETS, policy, np.random.default_rng(seed), tok.eos_token_id
        ),
    )


def keyed_run(setup, cfg, index, forget):
    """Sample `index` of `cfg` and the 'keyed' script's conversations over it (forget_prob `forget`)."""
    tok, prompts = setup
    sample = generate_sample(cfg, index, tok)
    policy = ScriptedPolicy(forget_prob=forget, note_style="keyed")
    ids = tokenize_document(tok, sample.text())
    rng = np.random.default_rng(0)
    return sample, scripted_conversations(sample, ids, tok, prompts, BUDGETS, policy, rng, tok.eos_token_id)


def split_at_memory(prompt, memory) -> list[tuple[list[int], list[int]]]:
    """Every (before, after) with prompt == before + memory + after."""
    prompt, memory = list(prompt), list(memory)
    return [
        (prompt[:i], prompt[i + len(memory) :])
        for i in range(len(prompt) - len(memory) + 1)
        if prompt[i : i + len(memory)] == memory
    ]


def same_but_memory(script_prompt, script_memory, agent_prompt, agent_memory) -> bool:
    """The two prompts are the same tokens around their memories: the same layout, question and chunk."""
    agent_splits = split_at_memory(agent_prompt, agent_memory)
    return any(split in agent_splits for split in split_at_memory(script_prompt, script_memory))


def test_prompts_are_the_agents_layout_and_a_perfect_script_answers(setup, tmp_path):
    """Every scripted prompt is, token for token, the prompt `MemoryAgent.run(record=True)` recorded for the same
    question and document, but for the memory inside it (the agent's memory is what its model wrote)."""
    from hf_tiny import make_hf_model, save_hf_model
    from memagent_jax.agent import MemoryAgent
    from memagent_jax.models import load_hf_params

    tok, prompts = setup
    folder = save_hf_model(make_hf_model("qwen2_tied", seed=3, vocab_size=len(tok)), str(tmp_path / "model"))
    params, config = load_hf_params(folder)
    # No stop token: every memory the agent writes is exactly memory_tokens sampled ids.
    agent = MemoryAgent(params, config, tok, budgets=BUDGETS, stop_token_ids=())
    runs = [run(setup, ScriptedPolicy(forget_prob=0.0), index, distractors=3) for index in range(10)]
    recorded = agent.run(
        [sample.question for sample, _, _ in runs], [ids for _, ids, _ in runs], rng=0, record=True
    ).conversations
    for (sample, ids, convs), agent_convs in zip(runs, recorded):
        assert [c.kind for c in convs] == ["memory"] * len(convs[:-1]) + ["final"]
        assert [(c.kind, c.step) for c in convs] == [(c.kind, c.step) for c in agent_convs]
        assert convs[0].prompt_ids.tolist() == agent_convs[0].prompt_ids.tolist()  # both start from the same memory
        memory = agent_memory = encode_text(tok, AgentTemplates().initial_memory)
        for conv, agent_conv in zip(convs, agent_convs):
            assert same_but_memory(conv.prompt_ids, memory, agent_conv.prompt_ids, agent_memory), conv.step
            memory, agent_memory = conv.response_ids[:-1].tolist(), agent_conv.response_ids.tolist()
            if conv.kind == "memory":
                assert conv.response_ids[-1] == tok.eos_token_id
                assert len(agent_memory) == BUDGETS.memory_tokens
        assert tok.decode(convs[-1].response_ids[:-1]) == "\\boxed{ " + sample.answers[0] + "}"


def test_forgetting_and_overwriting(setup):
    tok, _ = setup
    forgot = wrong = 0
    for index in range(20):
        sample, _, convs = run(setup, ScriptedPolicy(forget_prob=1.0), index)
        answer_step = sample.facts[0].token_offset // 32
        final = tok.decode(convs[-1].response_ids[:-1])
        forgot += answer_step < len(convs) - 2  # the answer is not in the last chunk: the notes are dropped
        assert final == ("\\boxed{ unknown}" if answer_step < len(convs) - 2 else "\\boxed{ " + sample.answers[0] + "}")
        sample, _, convs = run(setup, ScriptedPolicy(forget_prob=0.0, overwrite_prob=1.0), index, distractors=4)
        last_fact = max(sample.facts, key=lambda f: f.token_offset)
        assert tok.decode(convs[-1].response_ids[:-1]) == "\\boxed{ " + last_fact.triple[2] + "}"
        wrong += last_fact.role != "answer"
    assert forgot > 0 and wrong > 0


def test_sft_batch_trains_on_responses_only(setup):
    _, _, convs = run(setup, ScriptedPolicy(), 0)
    batch = conversations_to_sft_batch(convs, rows_multiple=4)
    assert batch.num_rows % 4 == 0
    assert batch.num_response_tokens() == sum(len(c.response_ids) for c in convs)
    with pytest.raises(ValueError, match="forget_prob"):
        ScriptedPolicy(forget_prob=1.5)


def test_keyed_notes_name_the_asked_key_from_the_first_chunk(setup):
    """'keyed' notes: " for <asked> ?" until the asked fact is read, then " for <asked> <Word>"; dropping the
    notes goes back to " ... ?"; the final answer is the noted word (or unknown)."""
    tok, prompts = setup
    cfg = SyntheticConfig(
        "keyed_recall", num_tokens=32 * 6, num_distractors=3, chunk_tokens=32, chunk_aligned=True, fact_style="pair"
    )
    for index in range(12):
        for forget in (0.0, 1.0):
            sample, convs = keyed_run(setup, cfg, index, forget)
            creature = next(f.triple[0] for f in sample.facts if f.role == "answer")
            answer_step = next(f.token_offset for f in sample.facts if f.role == "answer") // 32
            notes = [tok.decode(c.response_ids[:-1]) for c in convs[:-1]]
            for k, note in enumerate(notes):
                found = k == answer_step or (answer_step < k and forget == 0.0)
                assert note == f" for {creature} {sample.answers[0] if found else '?'}", (k, note)
            kept = forget == 0.0 or answer_step == len(notes) - 1
            answer = sample.answers[0] if kept else "unknown"
            assert tok.decode(convs[-1].response_ids[:-1]) == "\\boxed{ " + answer + "}"


def test_noted_answers_copy_the_notes_word_token_and_spelled_ones_do_not(setup):
    """The answer step's signal: with answer_form='noted' the boxed word is the very token the notes hold (one
    copy), for every answer word; 'spelled' re-tokenises it after the brace, which for this tokenizer splits
    words that share a first piece ("Mor" and "Mi" both start with "M") into different token sequences than the
    notes'. Both forms score 1 with the verifier's reward."""
    from memagent_jax.data.synthetic.keyed_recall import RECALL_WORDS
    from memagent_jax.evaluation.verifier import reward
    from memagent_jax.rl.warm_start import scripted_answer_ids

    tok, _ = setup
    respelled = []
    for word in RECALL_WORDS:
        noted_word = encode_text(tok, " " + word)  # how keyed notes (" for <creature> <Word>") hold it
        noted = scripted_answer_ids(tok, word, "noted")
        spelled = scripted_answer_ids(tok, word, "spelled")
        assert noted == encode_text(tok, "\\boxed{") + noted_word + encode_text(tok, "}")
        assert tok.decode(noted) == "\\boxed{ " + word + "}" and tok.decode(spelled) == "\\boxed{" + word + "}"
        assert reward(tok.decode(noted), [word]) == reward(tok.decode(spelled), [word]) == 1.0
        body = spelled[len(encode_text(tok, "\\boxed{")) : -len(encode_text(tok, "}"))]
        respelled.append(body != noted_word)
    # The spelled form asks the model to re-spell most words: the mechanism the noted form removes.
    assert sum(respelled) > len(RECALL_WORDS) // 2
    with pytest.raises(ValueError, match="answer_form"):
        ScriptedPolicy(answer_form="boxed")


def test_keyed_notes_follow_a_two_hop_chain(setup):
    """Two-hop rows: the asked creature's fact names another ("Remember <a> as <b>."); the notes add " as <b>"
    and look for <b>'s word, which the answer then copies; dropping the notes loses the chain."""
    tok, prompts = setup
    cfg = SyntheticConfig(
        "keyed_recall",
        num_tokens=32 * 6,
        num_distractors=3,
        chunk_tokens=32,
        chunk_aligned=True,
        fact_style="pair",
        hops=2,
    )
    checked = 0
    for index in range(12):
        sample, convs = keyed_run(setup, cfg, index, 0.0)
        pointer = next(f for f in sample.facts if f.role == "answer")
        stated = next(f for f in sample.facts if f.role == "support")
        asked, bridge = pointer.triple[0], pointer.triple[2]
        assert pointer.triple[1] == "same_word_as" and stated.triple[0] == bridge
        at_pointer, at_word = pointer.token_offset // 32, stated.token_offset // 32
        notes = [tok.decode(c.response_ids[:-1]) for c in convs[:-1]]
        for k, note in enumerate(notes):
            if k < at_pointer:
                assert note == f" for {asked} ?", (k, note)
            elif k < at_word:
                assert note == f" for {asked} as {bridge} ?", (k, note)
            else:
                assert note == f" for {asked} as {bridge} {sample.answers[0]}", (k, note)
        assert tok.decode(convs[-1].response_ids[:-1]) == "\\boxed{ " + sample.answers[0] + "}"
        checked += at_pointer < at_word
    assert checked > 0  # some chains span chunks
