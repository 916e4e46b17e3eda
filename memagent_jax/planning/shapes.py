"""What the planner sizes, written out from the architecture and the agent's budgets: every parameter's shape
(`models.transformer`), the matmul weights a token passes through, and the static token layout of the agent's
programs (`Layout`)."""

from __future__ import annotations

import dataclasses
import math


def param_shapes(mc) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Every parameter leaf of `models.transformer` (path -> shape), written out by hand from the architecture
    (the tests check it against the real `abstract_params`)."""
    v, d, f, l = mc.vocab_size, mc.hidden_size, mc.intermediate_size, mc.num_layers
    h, k, dh = mc.num_heads, mc.num_kv_heads, mc.head_dim
    out: dict[tuple[str, ...], tuple[int, ...]] = {
        ("embed",): (v, d),
        ("final_norm", "weight"): (d,),
        ("layers", "attn_norm", "weight"): (l, d),
        ("layers", "mlp_norm", "weight"): (l, d),
        ("layers", "attn", "q_proj"): (l, d, h, dh),
        ("layers", "attn", "k_proj"): (l, d, k, dh),
        ("layers", "attn", "v_proj"): (l, d, k, dh),
        ("layers", "attn", "o_proj"): (l, h, dh, d),
        ("layers", "mlp", "gate_proj"): (l, d, f),
        ("layers", "mlp", "up_proj"): (l, d, f),
        ("layers", "mlp", "down_proj"): (l, f, d),
    }
    if not mc.tie_word_embeddings:
        out[("lm_head",)] = (d, v)
    if mc.attention_bias:
        out[("layers", "attn", "q_bias")] = (l, h, dh)
        out[("layers", "attn", "k_bias")] = (l, k, dh)
        out[("layers", "attn", "v_bias")] = (l, k, dh)
    if mc.attention_out_bias:
        out[("layers", "attn", "o_bias")] = (l, d)
    if mc.qk_norm:
        out[("layers", "attn", "q_norm")] = (l, dh)
        out[("layers", "attn", "k_norm")] = (l, dh)
    if mc.mlp_bias:
        out[("layers", "mlp", "gate_bias")] = (l, f)
        out[("layers", "mlp", "up_bias")] = (l, f)
        out[("layers", "mlp", "down_bias")] = (l, d)
    return out


def param_count(mc) -> int:
    return sum(math.prod(s) for s in param_shapes(mc).values())


def layer_matmul_params(mc) -> int:
    """Weights of one layer's matmuls (q, k, v, o, gate, up, down): 2 FLOPs per weight per token."""
    d, f, h, k, dh = mc.hidden_size, mc.intermediate_size, mc.num_heads, mc.num_kv_heads, mc.head_dim
    return 2 * d * h * dh + 2 * d * k * dh + 3 * d * f


def matmul_params(mc) -> int:
    """All matmul weights of a full forward at one position: layers + the LM head (D x V, tied or not);
    the embedding lookup is a gather, not a matmul."""
    return mc.num_layers * layer_matmul_params(mc) + mc.hidden_size * mc.vocab_size


@dataclasses.dataclass(frozen=True)
class Layout:
    """Static token layout of the agent's programs (agent/program.py), from the budgets.

    The literal template pieces depend on the tokenizer and wording; the defaults overestimate our templates
    under a Qwen chat template (header + instruction ~90 tokens before the memory, ~50 after).
    """

    question: int = 1024
    memory: int = 1024
    chunk: int = 5000
    answer: int = 1024
    chunks_per_segment: int = 4
    prefix_template: int = 128  # [U0] + [U1]: chat header, instruction, "notes so far" heading
    rest_template: int = 64  # [U2] + [U3]: section heading, closing instruction, assistant header
    final_template: int = 128  # the final prompt's literal pieces

    @property
    def prefix(self) -> int:
        """P0: [U0][question][U1], prefilled once per document."""
        return self.prefix_template + self.question

    @property
    def rest(self) -> int:
        """R: [memory][U2][chunk][U3], prefilled at every chunk step."""
        return self.memory + self.chunk + self.rest_template

    @property
    def update_slots(self) -> int:
        """Slots of the memory-update KV cache: prefix + rest + the new memory."""
        return self.prefix + self.rest + self.memory

    @property
    def final_prompt(self) -> int:
        return self.final_template + self.question + self.memory

    @property
    def final_slots(self) -> int:
        return self.final_prompt + self.answer

    def learn_length(self, multiple: int = 64) -> int:
        """T of the learner's batch: the longest conversation (prompt + response), rounded up as
        `rollout_to_batch` does (worst case: a memory step with every slot used)."""
        longest = max(self.update_slots, self.final_slots)
        return -(-longest // multiple) * multiple

    def head_positions(self, length: int) -> int:
        """Positions per learner row the LM head runs on: the response window the learner picks for the longest
        response (a memory or an answer at its budget), or all `length` when that window is not shorter."""
        from memagent_jax.rl.batch import head_window

        window = head_window(max(self.memory, self.answer))
        return window if window < length else length

    def chunks(self, doc_tokens: int) -> int:
        return -(-doc_tokens // self.chunk)

    def computed_chunk_steps(self, doc_tokens: int) -> int:
        """Chunk steps the segment program runs (whole segments of `chunks_per_segment`; a step past a
        document's end still prefills, its decode stops at once)."""
        s = self.chunks_per_segment
        return -(-self.chunks(doc_tokens) // s) * s
