"""Prompt templates of the memory agent and their static token layout.

Two prompts, each sent as one user message through the tokenizer's chat template:

* memory update, at every chunk: the question, the memory so far, the current chunk -> new memory;
* final answer, after the last chunk: the question and the memory -> an answer in ``\\boxed{}``.

Templates are plain text with placeholders ``{question}``, ``{memory}``, ``{chunk}`` (each exactly once,
in that order; any other braces, e.g. ``\\boxed{}``, are literal). They are configurable (config fields
or a JSON/YAML-free plain JSON file), because released memory-agent checkpoints were trained with their
own wording.

The chat template is applied once per template with sentinel strings in place of the placeholders; the
rendered text is split at the sentinels and each literal piece is tokenized on its own. A step's prompt
is then the concatenation ``piece0 + question_ids + piece1 + memory_ids + piece2 + chunk_ids + piece3``,
built from token ids: the memory is carried as the exact sampled ids (never re-tokenized) and the chunk
as the document's ids, which is what RL needs.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import numpy as np

DEFAULT_MEMORY_UPDATE = (
    "You are reading a long document one section at a time so that you can answer a question at the end. "
    "Earlier sections will not be shown again: your notes are all you keep from them.\n\n"
    "Question:\n{question}\n\n"
    "Your notes so far:\n{memory}\n\n"
    "Next section of the document:\n{chunk}\n\n"
    "Write your updated notes. Keep every fact from the old notes and from this section that could help "
    "answer the question, leave out what cannot, and reply with the notes only."
)

DEFAULT_FINAL_ANSWER = (
    "You have read a long document section by section and kept notes on it.\n\n"
    "Question:\n{question}\n\n"
    "Your notes:\n{memory}\n\n"
    "Answer the question using the notes. Put the final answer inside \\boxed{}, for example \\boxed{Paris}."
)

DEFAULT_INITIAL_MEMORY = "No notes yet."

_SENTINELS = {name: f"\u27e6memagent:{name}\u27e7" for name in ("question", "memory", "chunk")}


class TemplateError(ValueError):
    """A template is missing a placeholder, repeats one, or the chat template mangles it."""


@dataclasses.dataclass(frozen=True)
class AgentTemplates:
    """The agent's wording. `system`: optional system message placed before the user message."""

    memory_update: str = DEFAULT_MEMORY_UPDATE
    final_answer: str = DEFAULT_FINAL_ANSWER
    initial_memory: str = DEFAULT_INITIAL_MEMORY
    system: str | None = None

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "AgentTemplates":
        """Reads a JSON file with any of the fields `memory_update`, `final_answer`, `initial_memory`, `system`."""
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"template file {path!r} does not exist") from None
        except json.JSONDecodeError as e:
            raise TemplateError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise TemplateError(f"{path}: expected a JSON object with template fields")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise TemplateError(f"{path}: unknown template field(s) {sorted(unknown)}; known: {sorted(known)}")
        for key, value in data.items():
            if value is not None and not isinstance(value, str):
                raise TemplateError(f"{path}: field {key!r} must be a string")
        return cls(**data)


@dataclasses.dataclass(frozen=True)
class PromptLayout:
    """Token layout of one template: literal pieces around variable slots.

    pieces: len(slots) + 1 tuples of token ids; slots: slot names in order, e.g.
    ('question', 'memory', 'chunk'). The prompt is pieces[0] + slot0 + pieces[1] + ... + pieces[-1].
    """

    pieces: tuple[tuple[int, ...], ...]
    slots: tuple[str, ...]

    def assemble(self, values: dict[str, Sequence[int]]) -> list[int]:
        """The unpadded prompt ids for given slot contents (host side; the reference loop uses this)."""
        out = list(self.pieces[0])
        for slot, piece in zip(self.slots, self.pieces[1:]):
            out.extend(int(t) for t in values[slot])
            out.extend(piece)
        return out

    def padded_length(self, sizes: dict[str, int]) -> int:
        return sum(len(p) for p in self.pieces) + sum(sizes[s] for s in self.slots)


def _render(tokenizer, content: str, system: str | None) -> str:
    messages: list[dict[str, Any]] = []
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": content})
    if getattr(tokenizer, "chat_template", None) is None:
        raise TemplateError("the tokenizer has no chat template (tokenizer_config.json 'chat_template' or "
                            "chat_template.jinja); memory agents wrap every prompt as a chat turn")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of plain text, no special tokens added."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def build_layout(tokenizer, template: str, slots: tuple[str, ...], system: str | None = None,
                 *, name: str = "template") -> PromptLayout:
    """Renders `template` through the chat template and splits it into literal token pieces."""
    for slot in slots:
        count = template.count("{" + slot + "}")
        if count != 1:
            raise TemplateError(f"{name}: placeholder {{{slot}}} must appear exactly once, found {count}")
    positions = [template.index("{" + slot + "}") for slot in slots]
    if positions != sorted(positions):
        raise TemplateError(f"{name}: placeholders must appear in the order {', '.join(slots)}")
    content = template
    for slot in slots:
        content = content.replace("{" + slot + "}", _SENTINELS[slot])
    rendered = _render(tokenizer, content, system)
    pieces = []
    rest = rendered
    for slot in slots:
        sentinel = _SENTINELS[slot]
        if rendered.count(sentinel) != 1:
            raise TemplateError(f"{name}: the tokenizer's chat template altered the {{{slot}}} placeholder")
        before, rest = rest.split(sentinel)
        pieces.append(tuple(encode_text(tokenizer, before)))
    pieces.append(tuple(encode_text(tokenizer, rest)))
    return PromptLayout(pieces=tuple(pieces), slots=slots)


@dataclasses.dataclass(frozen=True)
class AgentPrompts:
    """Token layouts of both prompts plus the initial memory ids, for one tokenizer."""

    update: PromptLayout  # slots: question, memory, chunk
    final: PromptLayout  # slots: question, memory
    initial_memory: tuple[int, ...]

    @classmethod
    def build(cls, tokenizer, templates: AgentTemplates = AgentTemplates()) -> "AgentPrompts":
        update = build_layout(tokenizer, templates.memory_update, ("question", "memory", "chunk"),
                              templates.system, name="memory_update template")
        final = build_layout(tokenizer, templates.final_answer, ("question", "memory"), templates.system,
                             name="final_answer template")
        return cls(update=update, final=final, initial_memory=tuple(encode_text(tokenizer, templates.initial_memory)))


def pad_to(ids: Sequence[int], size: int, pad_id: int = 0) -> tuple[np.ndarray, int]:
    """Right-pads `ids` to `size` -> (array [size] int32, real length)."""
    if len(ids) > size:
        raise ValueError(f"{len(ids)} tokens do not fit a slot of {size}")
    out = np.full((size,), pad_id, np.int32)
    out[:len(ids)] = ids
    return out, len(ids)
