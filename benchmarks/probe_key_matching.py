"""Probe: how many updates does the main job's tiny model need to learn key matching?

    python benchmarks/probe_key_matching.py --mode agent-step                 # ~10 min on 2 CPU cores
    python benchmarks/probe_key_matching.py --mode agent-step --notes keyed
    python benchmarks/probe_key_matching.py --mode recall --updates 2000     # ~5 min
    python benchmarks/probe_key_matching.py --mode recall --pretrain copy --pretrain-updates 300 --updates 1500
    python benchmarks/probe_key_matching.py --pretrain copy:300,recall:1500 --updates 1000
    python benchmarks/probe_key_matching.py --mode agent-step --updates 20 --examples 600 --every 10   # smoke
    python benchmarks/probe_key_matching.py --init induction --fact-style pair --notes for-keyed --lr 1e-3 \
        --updates 100 --every 25 --examples 4000     # the main job's setting: ~1 min

A question-conditioned main job needs the model to find, in a chunk holding several facts "The secret word for
<creature> is <Word>.", the one whose creature the question names, and note its word. This script trains the main
job's model shape (`configs/tiny_synthetic.py`: Qwen2 architecture, width 128, 2 layers, 4 heads, 2 KV heads) from
random weights on the densest forms of that skill, and prints held-out accuracy as training goes:

agent-step       SFT on the one agent step that matters: the memory-update prompt (the main job's compact wording,
                 budgets and tokenizer recipe) of a one-chunk document holding the asked fact and `--lookalikes`
                 facts for other creatures, one of them beside it; the response is the notes. Accuracy: the
                 noted word, teacher-forced (chance among the chunk's words = 1 / (lookalikes + 1)).
                 --notes value:     notes = " <Word>" (the main job's note style);
                 --notes keyed:     notes = " <creature> <Word>" (the creature first, so the word's query is
                                    the creature token itself);
                 --notes keyed-is:  notes = " <creature> is <Word>" (a verbatim span of the fact);
                 --notes for-keyed: notes = " for <creature> <Word>" (the main job's notes with the
                                    induction init: " for" precedes the creature in the question).
--fact-style pair  facts "Remember <creature> <Word>." (the word right after its key; the main job's form).
--init induction   random weights plus the hand-wired induction circuit of memagent_jax/models/induction.py
                   (rope theta 1e6, as the main job's model); --init random: random weights only.
recall           language-model loss on rows of `--facts` facts in the task's words followed by each creature
                 and its word in a random order; accuracy over the recalled words of each freshly drawn
                 training batch, rows never seen before (chance 1 / facts).
--pretrain copy|recall   first `--pretrain-updates` of copying repeated random token sequences (the induction-head
                 task; accuracy on the repeated half) or of recall; the probed task then trains from those
                 weights (fresh optimiser state). A comma-separated list runs stages in order, each `name` or
                 `name:updates` (e.g. copy:300,recall:1500).

Everything is built in-process (tokenizer trained with `tokenizers` on the task's text, random model); nothing is
downloaded. Adam, warm-up then cosine decay to 10% of `--lr`, batch `--batch`.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402


def _tokenizer_and_prompts(folder: str):
    from memagent_jax.agent import AgentPrompts, AgentTemplates
    from memagent_jax.configs import cpu_agent
    from memagent_jax.data.synthetic import tokenizer_corpus
    from memagent_jax.data.tokenizer import load_tokenizer, train_tokenizer

    t = cpu_agent.TEMPLATES  # the main job's wording and tokenizer recipe (pipeline.make_assets)
    texts = itertools.chain(
        tokenizer_corpus(num_samples=16, num_tokens=300, seed=0),
        [t["memory_update"], t["final_answer"], t["initial_memory"]] * 50,
    )
    train_tokenizer(texts, folder, vocab_size=1024)
    tokenizer = load_tokenizer(folder)
    return tokenizer, AgentPrompts.build(tokenizer, AgentTemplates(**t))


def _model_config(tokenizer, rope_theta: float = 1e4):
    from memagent_jax.models.config import ModelConfig, RopeConfig

    return ModelConfig(
        model_type="qwen2",
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=512,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        attention_bias=True,
        eos_token_ids=(tokenizer.eos_token_id,),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        rope=RopeConfig(theta=rope_theta),
    )


def agent_step_rows(
    tokenizer, prompts, count: int, lookalikes: int, notes: str, seed: int = 7, fact_style: str = "sentence"
):
    """[count, T] ids, [count, T] real-token mask, [count, T] loss weights (on the next token), [count] index of
    the position whose next token is the noted word."""
    from memagent_jax.agent import AgentBudgets
    from memagent_jax.agent.chunking import tokenize_document
    from memagent_jax.agent.templates import encode_text
    from memagent_jax.configs import cpu_agent
    from memagent_jax.data.synthetic import SyntheticConfig, generate_sample
    from memagent_jax.rl.warm_start import ScriptedPolicy, StraddlingFactError, scripted_conversations

    budgets = AgentBudgets(**cpu_agent.BUDGETS)
    task = SyntheticConfig(
        task="keyed_recall",
        num_tokens=budgets.chunk_tokens,
        num_distractors=lookalikes,
        same_chunk_distractors=min(1, lookalikes),
        chunk_tokens=budgets.chunk_tokens,
        chunk_aligned=True,
        fact_style=fact_style,
        seed=seed,
    )
    policy, rng = ScriptedPolicy(forget_prob=0.0), np.random.default_rng(seed)
    rows, index = [], 0
    while len(rows) < count:
        sample = generate_sample(task, index, tokenizer)
        index += 1
        try:
            step = scripted_conversations(
                sample,
                tokenize_document(tokenizer, sample.text()),
                tokenizer,
                prompts,
                budgets,
                policy,
                rng,
                tokenizer.eos_token_id,
            )[0]
        except StraddlingFactError:
            continue
        creature, _, word = next(f.triple for f in sample.facts if f.role == "answer")
        text = {
            "value": f" {word}",
            "keyed": f" {creature} {word}",
            "keyed-is": f" {creature} is {word}",
            "for-keyed": f" for {creature} {word}",
        }[notes]
        response = encode_text(tokenizer, text) + [tokenizer.eos_token_id]
        before_word = len(step.prompt_ids) - 1 + {"value": 0, "keyed": 1, "keyed-is": 2, "for-keyed": 2}[notes]
        seq = list(step.prompt_ids) + response
        assert seq[before_word + 1] == encode_text(tokenizer, " " + word)[0], "the scored position is the word's"
        rows.append((seq, len(step.prompt_ids), before_word))
    width = max(len(ids) for ids, _, _ in rows)
    ids = np.zeros((count, width), np.int32)
    mask = np.zeros((count, width), bool)
    weights = np.zeros((count, width), np.float32)
    word_at = np.zeros(count, np.int32)
    for r, (seq, prompt_len, before_word) in enumerate(rows):
        ids[r, : len(seq)], mask[r, : len(seq)] = seq, True
        weights[r, prompt_len - 1 : len(seq) - 1] = 1.0
        word_at[r] = before_word
    return ids, mask, weights, word_at


def recall_rows(tokenizer, count: int, facts: int, rng: np.random.Generator):
    """Rows of `facts` facts in the task's words, then every creature followed by its word (shuffled); loss and
    accuracy on the recalled words."""
    from memagent_jax.agent.templates import encode_text
    from memagent_jax.data.synthetic.keyed_recall import RECALL_WORDS
    from memagent_jax.data.synthetic.vocabulary import KEY_CREATURES

    one = lambda text: encode_text(tokenizer, text)[0]  # noqa: E731 (every creature and word is one token)
    creatures = [one(" " + c) for c in KEY_CREATURES]
    words = [one(" " + w) for w in RECALL_WORDS]
    lead, is_, stop = encode_text(tokenizer, " The secret word for"), one(" is"), one(".")
    rows, weights = [], []
    for _ in range(count):
        keys = rng.choice(len(creatures), facts, replace=False)
        values = rng.choice(len(words), facts, replace=False)
        seq = [t for k, v in zip(keys, values) for t in lead + [creatures[k], is_, words[v], stop]]
        w = [0.0] * len(seq)
        for i in rng.permutation(facts):
            seq += [creatures[keys[i]], words[values[i]]]
            w += [1.0, 0.0]  # the weight sits on the position *before* the word (next-token loss)
        rows.append(seq)
        weights.append(w)
    ids = np.asarray(rows, np.int32)
    return ids, np.ones_like(ids, bool), np.asarray(weights, np.float32), None


def copy_rows(count: int, length: int, vocab: int, rng: np.random.Generator):
    """Random token sequences repeated once: the second half is predictable only by copying."""
    half = rng.integers(3, vocab, (count, length // 2)).astype(np.int32)
    ids = np.concatenate([half, half], 1)
    weights = np.zeros(ids.shape, np.float32)
    weights[:, length // 2 : -1] = 1.0  # from the second copy of x1 on (x1 itself follows nothing seen)
    return ids, np.ones_like(ids, bool), weights, None


def make_trainer(config, lr: float, updates: int):
    import jax
    import jax.numpy as jnp
    import optax

    from memagent_jax.models.transformer import forward

    optimizer = optax.adamw(
        optax.warmup_cosine_decay_schedule(0.0, lr, min(50, updates - 1), updates, lr * 0.1), weight_decay=0.0
    )

    def loss_and_accuracy(params, ids, mask, weights):
        """ids/mask/weights [B, T]; weights[b, t] scores the prediction of ids[b, t + 1]."""
        positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
        logits, _ = forward(params, ids, positions, mask, config=config)
        logp = jax.nn.log_softmax(logits[:, :-1])
        nll = -jnp.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]
        w = weights[:, :-1]
        right = (jnp.argmax(logits[:, :-1], -1) == ids[:, 1:]) * w
        return (nll * w).sum() / w.sum(), right.sum() / w.sum()

    @jax.jit
    def step(params, opt_state, ids, mask, weights):
        (loss, acc), grads = jax.value_and_grad(loss_and_accuracy, has_aux=True)(params, ids, mask, weights)
        update, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, update), opt_state, loss, acc

    @jax.jit
    def word_accuracy(params, ids, mask, word_at):
        positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
        logits, _ = forward(params, ids, positions, mask, config=config)
        rows = jnp.arange(ids.shape[0])
        return (jnp.argmax(logits[rows, word_at], -1) == ids[rows, word_at + 1]).mean()

    return optimizer, step, word_accuracy


def train(params, config, draw, updates: int, lr: float, every: int, label: str, held_out=None):
    """`draw()` -> one batch (ids, mask, weights); prints the batch loss/accuracy, or the held-out word accuracy."""
    optimizer, step, word_accuracy = make_trainer(config, lr, updates)
    opt_state = optimizer.init(params)
    t0 = time.perf_counter()
    for u in range(1, updates + 1):
        ids, mask, weights = draw()
        params, opt_state, loss, acc = step(params, opt_state, ids, mask, weights)
        if u % every == 0 or u == updates:
            if held_out is not None:
                acc = word_accuracy(params, *held_out)
                what = "held-out word accuracy"
            else:
                what = "batch accuracy"
            print(
                f"[{label}] update {u:>5}  loss {float(loss):.3f}  {what} {float(acc):.3f}  "
                f"{time.perf_counter() - t0:.0f} s",
                flush=True,
            )
    return params


def pretrain_stages(text: str, default_updates: int, parser) -> list[tuple[str, int]]:
    """'none' | 'copy' | 'copy:300,recall:1500' -> [(task, updates), ...]."""
    stages = []
    for item in filter(None, text.split(",")):
        name, _, count = item.partition(":")
        if name == "none" and not count:
            continue
        if name not in ("copy", "recall") or (count and not count.isdigit()):
            parser.error(f"--pretrain: {item!r} is not copy, recall or name:updates")
        stages.append((name, int(count) if count else default_updates))
    return stages


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", choices=("agent-step", "recall"), default="agent-step")
    parser.add_argument(
        "--pretrain",
        default="none",
        help="train on these tasks first: copy | recall | a list like copy:300,recall:1500",
    )
    parser.add_argument("--notes", choices=("value", "keyed", "keyed-is", "for-keyed"), default="value")
    parser.add_argument("--fact-style", choices=("sentence", "pair"), default="sentence")
    parser.add_argument("--init", choices=("random", "induction"), default="random")
    parser.add_argument("--updates", type=int, default=2500, help="optimiser updates (of the probed task)")
    parser.add_argument("--pretrain-updates", type=int, default=800, help="updates of the --pretrain task")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--lookalikes", type=int, default=2, help="agent-step: other creatures' facts in the chunk")
    parser.add_argument("--facts", type=int, default=4, help="recall: facts per row")
    parser.add_argument("--examples", type=int, default=20000, help="agent-step: distinct prompts (512 held out)")
    parser.add_argument("--every", type=int, default=250, help="print every this many updates")
    args = parser.parse_args()

    import jax

    from memagent_jax.models.transformer import init_params

    print(f"jax {jax.__version__} on {jax.default_backend()}, {os.cpu_count()} CPU cores; {vars(args)}")
    tokenizer, prompts = _tokenizer_and_prompts(os.path.join(tempfile.mkdtemp(), "tokenizer"))
    config = _model_config(tokenizer, rope_theta=1e6 if args.init == "induction" else 1e4)
    params = init_params(config, jax.random.key(0))
    if args.init == "induction":
        from memagent_jax.models.induction import wire_induction_heads

        params = wire_induction_heads(params, config, seed=0)
    rng = np.random.default_rng(1)
    stages = {
        "copy": lambda: copy_rows(args.batch, 64, 1000, rng)[:3],
        "recall": lambda: recall_rows(tokenizer, args.batch, args.facts, rng)[:3],
    }
    for stage in pretrain_stages(args.pretrain, args.pretrain_updates, parser):
        params = train(params, config, stages[stage[0]], stage[1], args.lr, args.every, stage[0])
    if args.mode == "recall":
        train(
            params,
            config,
            lambda: recall_rows(tokenizer, args.batch, args.facts, rng)[:3],
            args.updates,
            args.lr,
            args.every,
            "recall",
        )
        return
    t0 = time.perf_counter()
    ids, mask, weights, word_at = agent_step_rows(
        tokenizer, prompts, args.examples, args.lookalikes, args.notes, fact_style=args.fact_style
    )
    held = 512 if args.examples > 1024 else args.examples // 4
    train_rows = len(ids) - held
    print(
        f"{len(ids)} agent-step prompts of <= {ids.shape[1]} tokens ({time.perf_counter() - t0:.0f} s); "
        f"chance = {1 / (args.lookalikes + 1):.3f}"
    )

    def draw():
        pick = rng.integers(0, train_rows, args.batch)
        return ids[pick], mask[pick], weights[pick]

    held_out = (ids[train_rows:], mask[train_rows:], word_at[train_rows:])
    print(
        f"before training: held-out word accuracy {float(make_trainer(config, args.lr, 2)[2](params, *held_out)):.3f}"
    )
    train(params, config, draw, args.updates, args.lr, args.every, f"agent step, notes={args.notes}", held_out=held_out)


if __name__ == "__main__":
    main()
