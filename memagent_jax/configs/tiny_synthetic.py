"""The main job on the embedded default: a memory agent trained end to end on CPU, no downloads.

    python -m memagent_jax.pipeline --config configs/tiny_synthetic.py --workdir runs/tiny_synthetic
    python -m memagent_jax.pipeline --config configs/tiny_synthetic.py:quick --workdir /tmp/q

Stages (each resumes when re-run with the same workdir): make the task data and a tokenizer, create a tiny
Qwen2-architecture model, warm-start it by SFT on scripted (imperfect) memory traces, train it with
multi-conversation GRPO, evaluate both models at 1x..64x the training length, write a memory-trace report,
and export. The `quick` variant (`apply_quick_overrides`) shrinks every stage: about a minute, a pipeline check.

The task is `keyed_recall` from memagent_jax.data.synthetic (keyed_recall.py) in its "pair" form: keyed facts "Remember
<creature> <Word>." in a haystack of generated sentences, the asked one among look-alikes for other creatures
(`task.distractors_per_chunk` per chunk at every length, `same_chunk_distractors` of them beside the asked fact),
asked as "What is the secret word for <creature>?". The model starts from random weights plus one hand-wired
induction circuit (memagent_jax/models/induction.py; `model.init="random"` for none), which is what lets a
0.6M-parameter model match the question's creature to a fact's within the CPU budget. The notes name the asked
creature (" for <creature> <Word>"); the script's flaw (dropping its word at sections without the answer) is what
grows with the length and what GRPO fixes. A failed trajectory's final answer (a faithful copy of wrong notes) is not
pushed down (`rl.answer_advantage`). Half of the training rows are two-hop chains ("Remember <a> as <b>."
then "Remember <b> <Word>."), whose notes follow the chain; the answer copies the noted word's token.
"""

import ml_collections

from memagent_jax import configs
from memagent_jax.configs import cpu_agent


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    return configs.variant(
        "tiny_synthetic", arg, main_job_config, {"quick": apply_quick_overrides}, base_name="the main job"
    )


def main_job_config() -> ml_collections.ConfigDict:
    """The main job as shipped, every field with its meaning."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.task = ml_collections.ConfigDict(
        dict(
            name="keyed_recall",
            train_chunks=2,  # the warm start's documents are this many chunks long (the unit of the eval lengths)
            # GRPO's documents (0: train_chunks): longer rows give every trajectory more sections after the fact,
            # where the warm start's habit of dropping its notes shows and is penalised.
            rl_chunks=4,
            # Look-alike facts for other creatures per chunk, at every length (0: the asked fact alone, so keeping the
            # last fact read would do).
            distractors_per_chunk=1.0,
            same_chunk_distractors=1,  # of those, placed right beside the asked fact (in its chunk)
            # Look-alikes per chunk in the GRPO training rows (-1: distractors_per_chunk). Denser rows give GRPO more
            # of the rare steps where a look-alike's word is taken before the asked fact is read.
            rl_distractors_per_chunk=3.0,
            # GRPO rows (single-hop ones) whose asked creature has no fact in the document: the answer is then the
            # script's "unknown", so a look-alike's word noted while the notes hold "?" costs reward there; in every
            # other row the asked fact comes later and such a note costs nothing.
            rl_absent_fraction=0.0,
            # Look-alikes per chunk in the warm start's scripted documents (-1: distractors_per_chunk). More of them
            # tell each pair of creatures apart in more SFT steps (eval/key_confusion.txt shows the pairs confused).
            warm_distractors_per_chunk=-1.0,
            isolate_answer=False,  # no look-alike shares the asked fact's chunk
            # "Remember <creature> <Word>." ("sentence": "The secret word for <creature> is <Word>.")
            fact_style="pair",
            train_samples=4096,  # rows of the training file (GRPO draws from it)
            eval_multipliers="1;4;16;64",  # evaluation lengths, in multiples of train_chunks
            eval_questions=256,  # held-out questions per length
            # Training rows (GRPO and the warm start's script) that are two-hop chains: the asked creature's fact
            # names another creature ("Remember <a> as <b>."), whose fact holds the word.
            train_two_hop_fraction=0.5,
            two_hop_multipliers="1;16",  # two-hop evaluation files at these lengths ('': none)
            other_fact_multiplier=4,  # a file asking each document about a look-alike's fact (0: none)
            concat_multiplier=16,  # an evaluation file of this many 1x documents joined (0: none)
        )
    )
    c.tokenizer = ml_collections.ConfigDict(dict(vocab_size=1024))
    c.model = ml_collections.ConfigDict(
        dict(
            hidden_size=128,
            intermediate_size=512,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=32,
            max_position_embeddings=512,
            rope_theta=1e6,  # Qwen2's base: leaves rotary pairs that barely turn over a prompt (the matching head)
            init="induction",  # random weights plus one hand-wired induction circuit (models/induction.py); "random"
        )
    )
    b = cpu_agent.BUDGETS
    c.agent = ml_collections.ConfigDict(
        dict(
            question_tokens=b["question_tokens"],
            chunk_tokens=b["chunk_tokens"],
            memory_tokens=b["memory_tokens"],
            answer_tokens=b["answer_tokens"],
            **cpu_agent.TEMPLATES,
        )
    )
    c.warm_start = ml_collections.ConfigDict(
        dict(
            updates=384,  # optimiser updates
            trajectories_per_update=16,  # scripted trajectories (each: train_chunks + 1 conversations)
            updates_per_call=8,  # updates per jitted learner call
            learning_rate=1e-3,
            warmup=20,
            forget_prob=0.3,  # the script's flaw: at a section without the answer, drop the notes
            overwrite_prob=0.0,  # ... or note a look-alike fact for another key
            focus_repeats=1,  # SFT copies of the step that reads the asked fact among look-alikes
            # Hard-pair replay after the SFT above: probe the model's key confusion (eval/key_confusion.txt); while
            # some (asked, look-alike) pair is noted wrongly with p > `replay_threshold`, up to `replay_rounds`
            # times, train `replay_updates` more updates in which every other trajectory drills one of the pairs
            # found, then probe again. The model checked with the fewest pairs over 0.5 is exported. 0: off.
            replay_rounds=0,
            replay_updates=64,
            replay_threshold=0.3,
            # notes " for <creature> <Word>" (" ... ?" before the word is found); or "value", "fact"
            note_style="keyed",
            # The boxed answer writes the noted word with the notes' own tokens ("noted": \boxed{ Word}, one copied
            # token) or as the bare text tokenises ("spelled": \boxed{Word}, a re-spelling per word).
            answer_form="noted",
            # Tokens per packed learner row; 0 = one conversation per row. Packing changes which conversations share
            # each update of a call, and so the warm start that GRPO begins from.
            pack_length=0,
        )
    )
    c.rl = ml_collections.ConfigDict(
        dict(
            steps=90,
            # 16 groups per update: from the same five warm starts, 8 left the lowest seed at 94.5 at 64x and 87.5 on
            # two-hop 16x, against 96.5 and 91.8 (docs/results/main_job.md); twice the batch, twice the GRPO time.
            questions_per_step=16,
            group_size=16,
            num_minibatches=1,
            learning_rate=2e-4,
            schedule="constant",  # or "cosine": from learning_rate down to 0 at the last step
            # Linear warm-up of the learning rate from 0 over this many steps. 15 kept seed 2's GRPO from making a new
            # confused pair in its first steps, but not later, and lowered seed 1 (docs/results/main_job.md).
            warmup_steps=0,
            kl_coef=0.001,  # k3 KL to the warm start (the paper's 1e-3): holds what GRPO on 2-chunk rows rarely sees
            temperature=1.0,
            top_p=1.0,
            # "positive": the final answer's conversation is not pushed down in a failed trajectory (its notes were
            # wrong, and any answer would have scored 0; "shared", the reference, pushes down the closing brace after
            # the wrong word it copied, and drifted one word's brace into the stop token on one seed).
            answer_advantage="positive",
            dynamic_sampling=True,  # DAPO: train only on groups whose rewards differ ...
            max_sampling_batches=4,  # ... drawing up to 4 batches of questions per step to find 16 (rollouts are cheap)
            # Tokens per packed learner row; 0 = one conversation per row. The GRPO rows are about 80 tokens each, so
            # packing saves little padding here and lengthens attention.
            pack_length=0,
            # Held-out accuracy while training (greedy, `eval_questions` rows of the 4x and first two-hop files)
            # every `eval_every` steps and at the start: eval/accuracy_vs_step.png. 0: off.
            eval_every=15,
            eval_questions=64,
            # Hard-pair replay inside GRPO: every `replay_every` steps probe the policy's key confusion; while pairs
            # are noted wrongly with p > `replay_threshold`, a fraction `replay_fraction` of each step's questions are
            # drill rows of those pairs, with `replay_lookalikes` look-alikes each (few: a confused policy still gets
            # some rollouts right, so the group's rewards differ). 0: off.
            replay_every=0,
            replay_threshold=0.3,
            replay_fraction=0.5,
            replay_lookalikes=2,
            # LoRA adapters of this rank on every projection instead of full fine-tuning (0: full); alpha 2 x rank.
            lora_rank=0,
        )
    )
    c.eval = ml_collections.ConfigDict(
        dict(
            temperature=0.7,
            top_p=0.95,  # the paper's evaluation sampling
            batch_size=256,
            chunks_per_segment=8,
            report_questions=3,
        )
    )
    # The headline point in miniature, off by default (`make long-eval`): the RL model on documents of >= 1M
    # tokens, streamed segment by segment (constant device memory).
    c.long_eval = ml_collections.ConfigDict(
        dict(
            enabled=False,
            chunks=32768,  # 32768 chunks x 32 tokens = 1,048,576 tokens per document
            questions=32,
            batch_size=32,
        )
    )
    return c


def apply_quick_overrides(c: ml_collections.ConfigDict) -> None:
    """The quick block, in place: every stage small (a pipeline check for tests and a first look)."""
    c.task.update(
        dict(
            train_samples=256,
            eval_questions=32,
            eval_multipliers="1;4",
            two_hop_multipliers="1",
            other_fact_multiplier=1,
            concat_multiplier=4,
        )
    )
    c.warm_start.update(dict(updates=16, updates_per_call=8, trajectories_per_update=8))
    c.rl.update(
        dict(steps=2, questions_per_step=4, group_size=4, max_sampling_batches=2, eval_every=1, eval_questions=8)
    )
    c.eval.update(dict(batch_size=32, report_questions=2))
