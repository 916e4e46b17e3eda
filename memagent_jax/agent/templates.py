"""Prompt templates of the memory agent and their static token layout.

Two prompts, each sent as one user message through the tokenizer's chat template:

* memory update, at every chunk: the question, the memory so far, the current chunk -> new memory;
* final answer, after the last chunk: the question and the memory -> an answer in ``\\boxed{}``.

Templates are plain text with placeholders ``{question}``, ``{memory}``, ``{chunk}`` (each exactly once,
in that order; any other braces, e.g. ``\\boxed{}``, are literal). They are configurable (config fields
or a JSON/YAML-free plain JSON file), because released memory-agent checkpoints were trained with their
own wording.

Two prompt modes (`AgentTemplates.prompt_mode`):

* ``'pieces'`` (default): the chat template is applied once per template with sentinel strings in place of
  the placeholders; the rendered text is split at the sentinels and each literal piece is tokenized on its
  own. A step's prompt is the concatenation ``piece0 + question_ids + piece1 + memory_ids + piece2 +
  chunk_ids + piece3``, built from token ids inside the jitted chunk scan. Guarantee: the memory is the
  exact sampled ids (never re-tokenized), the chunk is exactly the document's ids. Not guaranteed: equality
  with tokenizing the whole prompt string; byte-level BPE can merge across a piece boundary (a question
  ending in ``?`` followed by a template ``\n`` is one Qwen token ``?\n`` in the whole string, two here;
  a template ``Question: `` followed by ``Who`` gives `` Who`` there, ``" "`` + ``Who`` here).

* ``'text'``: every prompt is formatted as one string -- the template filled with the question text, the
  memory text and the chunk text, wrapped as one user message by the chat template -- and tokenized once
  (`TextPrompter`), as the reference implementation does. Guarantee: each prompt is exactly
  ``tokenizer(apply_chat_template(filled template))``, so a user's templates file reproduces a released
  checkpoint's prompts token for token. The memory is decoded to text (special tokens skipped) and
  re-encoded with its neighbours, so the sampled memory ids reappear unchanged in the next prompt only
  when the tokenizer's encoding of the whole string reproduces them (typical inside the memory; a memory
  ending in punctuation followed by a template newline merges, e.g. ``.\n``); the chunk is the decoded
  text of the document's C-token chunk (a chunk cut inside a multi-byte character decodes to U+FFFD, as in
  the reference). The prompt is assembled on the host before every step, so the agent runs one jitted,
  static-shape step program per chunk instead of a scan over several (see `agent.text_mode`).

Control tokens, in both modes: only the chat template's own text (the literal pieces around the placeholders, the
system message, the templates' wording) is parsed for the tokenizer's control tokens (``<|im_start|>``,
``<|im_end|>``, ``<|endoftext|>``, ``<think>``, ... : every added token that is not whitespace only). The question,
the document, the memory text and the initial memory are read as plain text (`encode_text`): a document that spells
``<|im_end|>`` gives the tokens of those characters, never the token that closes the user turn. In text mode the
rendered prompt is split at the template's control tokens and the text between them (template text and user text
together) is tokenized as plain text, which is what whole-string tokenization gives for text that spells no
control token, since a tokenizer cuts its input at every control token anyway.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from memagent_jax import settings
from memagent_jax.data.tokenizer import control_token_ids, encode_plain, encode_plain_batch

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

PROMPT_MODES = ("pieces", "text")
UPDATE_SLOTS = ("question", "memory", "chunk")  # the placeholders of the memory-update template, in order
FINAL_SLOTS = ("question", "memory")  # ... and of the final-answer template


class TemplateError(settings.SettingError):
    """A template is missing a placeholder, repeats one, or the chat template mangles it."""


@dataclasses.dataclass(frozen=True)
class AgentTemplates:
    """The agent's wording and how it becomes tokens.

    memory_update / final_answer: templates with {question}, {memory}, {chunk} (the final one without {chunk}).
    initial_memory: the memory before the first chunk.   system: optional system message before the user one.
    prompt_mode: 'pieces' or 'text' (see the module docstring for what each guarantees).
    chat_template_kwargs: extra keyword arguments for the tokenizer's chat template, e.g.
      {"enable_thinking": false} for Qwen3 (its generation prompt then ends with an empty think block);
      stored as a sorted tuple of (name, value) pairs so the templates stay hashable.
    """

    memory_update: str = DEFAULT_MEMORY_UPDATE
    final_answer: str = DEFAULT_FINAL_ANSWER
    initial_memory: str = DEFAULT_INITIAL_MEMORY
    system: str | None = None
    prompt_mode: str = "pieces"
    chat_template_kwargs: Any = ()

    def __post_init__(self):
        if self.prompt_mode not in PROMPT_MODES:
            raise TemplateError(f"prompt_mode must be one of {PROMPT_MODES}, got {self.prompt_mode!r}")
        for name in ("memory_update", "final_answer", "initial_memory"):
            if not isinstance(getattr(self, name), str):
                raise TemplateError(f"{name} must be a string, got {getattr(self, name)!r}")
        if self.system is not None and not isinstance(self.system, str):
            raise TemplateError(f"system must be a string or None, got {self.system!r}")
        check_placeholders(self.memory_update, UPDATE_SLOTS, "memory_update")
        check_placeholders(self.final_answer, FINAL_SLOTS, "final_answer")
        kwargs = self.chat_template_kwargs
        if kwargs is None:
            kwargs = ()
        if isinstance(kwargs, Mapping):
            kwargs = tuple(sorted(kwargs.items()))
        try:
            kwargs = tuple((str(k), v) for k, v in kwargs)
            hash(kwargs)
        except (TypeError, ValueError):
            raise TemplateError(
                f"chat_template_kwargs must map names to plain values (strings, numbers, "
                f"booleans), got {self.chat_template_kwargs!r}"
            ) from None
        object.__setattr__(self, "chat_template_kwargs", kwargs)

    def replace(self, **changes) -> AgentTemplates:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """The fields as plain JSON values (what `from_file` reads back)."""
        return dict(dataclasses.asdict(self), chat_template_kwargs=dict(self.chat_template_kwargs))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> AgentTemplates:
        """Reads a JSON file with any of the fields `memory_update`, `final_answer`, `initial_memory`, `system`,
        `prompt_mode` (strings) and `chat_template_kwargs` (an object)."""
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
            if key == "chat_template_kwargs":
                if value is not None and not (
                    isinstance(value, dict)
                    and all(isinstance(v, (str, int, float, bool)) or v is None for v in value.values())
                ):
                    raise TemplateError(
                        f"{path}: field 'chat_template_kwargs' must be an object of plain values "
                        f'(e.g. {{"enable_thinking": false}})'
                    )
            elif value is not None and not isinstance(value, str):
                raise TemplateError(f"{path}: field {key!r} must be a string")
        try:
            return cls(**data)
        except TemplateError as e:
            raise TemplateError(f"{path}: {e}") from None


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


def _render(tokenizer, content: str, system: str | None, chat_template_kwargs=()) -> str:
    """The chat-template text of one user message (after an optional system message), generation prompt added."""
    messages: list[dict[str, Any]] = []
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": content})
    if getattr(tokenizer, "chat_template", None) is None:
        raise TemplateError(
            "the tokenizer has no chat template (tokenizer_config.json 'chat_template' or "
            "chat_template.jinja); memory agents wrap every prompt as a chat turn"
        )
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, **dict(chat_template_kwargs or ())
    )


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of user text (a question, a document, a memory) read as plain text: no special tokens added and
    no control token parsed from it (a spelled ``<|im_end|>`` gives the ids of its characters). Text that spells no
    control token gets exactly the ids of ``tokenizer(text, add_special_tokens=False)``."""
    return encode_plain(tokenizer, text)


def encode_template(tokenizer, text: str) -> list[int]:
    """Token ids of the chat template's own text: its control tokens (``<|im_start|>`` ...) parsed, no special
    tokens added. Only for template text, never for user text."""
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=False)["input_ids"])


def check_placeholders(template: str, slots: tuple[str, ...], name: str) -> None:
    """TemplateError naming `name` unless each of `slots` appears exactly once in `template`, in that order."""
    for slot in slots:
        count = template.count("{" + slot + "}")
        if count != 1:
            raise TemplateError(f"{name}: placeholder {{{slot}}} must appear exactly once, found {count}")
    positions = [template.index("{" + slot + "}") for slot in slots]
    if positions != sorted(positions):
        raise TemplateError(f"{name}: placeholders must appear in the order {', '.join(slots)}")


def fill_template(template: str, slots: tuple[str, ...], values: Mapping[str, str]) -> str:
    """The template with each placeholder replaced by its text, in one pass (a value that itself contains
    '{memory}' or the like is inserted literally, never substituted again)."""
    out, rest = [], template
    for slot in slots:
        before, rest = rest.split("{" + slot + "}", 1)
        out += [before, values[slot]]
    out.append(rest)
    return "".join(out)


def build_layout(
    tokenizer,
    template: str,
    slots: tuple[str, ...],
    system: str | None = None,
    *,
    name: str = "template",
    chat_template_kwargs=(),
) -> PromptLayout:
    """Renders `template` through the chat template and splits it into literal token pieces (control tokens
    parsed, `encode_template`); the slots take plain-text ids (`encode_text`) or sampled ids."""
    literal = literal_pieces(tokenizer, template, slots, system, name=name, chat_template_kwargs=chat_template_kwargs)
    return PromptLayout(pieces=tuple(tuple(encode_template(tokenizer, p)) for p in literal), slots=slots)


def literal_pieces(
    tokenizer,
    template: str,
    slots: tuple[str, ...],
    system: str | None = None,
    *,
    name: str = "template",
    chat_template_kwargs=(),
) -> list[str]:
    """The chat-template text of `template` around its placeholders: len(slots) + 1 strings."""
    check_placeholders(template, slots, name)
    rendered = _render(tokenizer, fill_template(template, slots, _SENTINELS), system, chat_template_kwargs)
    pieces = []
    rest = rendered
    for slot in slots:
        sentinel = _SENTINELS[slot]
        if rendered.count(sentinel) != 1:
            raise TemplateError(f"{name}: the tokenizer's chat template altered the {{{slot}}} placeholder")
        before, rest = rest.split(sentinel)
        pieces.append(before)
    pieces.append(rest)
    return pieces


@dataclasses.dataclass(frozen=True)
class AgentPrompts:
    """Token layouts of both prompts plus the initial memory ids, for one tokenizer."""

    update: PromptLayout  # slots: question, memory, chunk
    final: PromptLayout  # slots: question, memory
    initial_memory: tuple[int, ...]

    @classmethod
    def build(cls, tokenizer, templates: AgentTemplates = AgentTemplates()) -> AgentPrompts:
        kw = templates.chat_template_kwargs
        update = build_layout(
            tokenizer,
            templates.memory_update,
            ("question", "memory", "chunk"),
            templates.system,
            name="memory_update template",
            chat_template_kwargs=kw,
        )
        final = build_layout(
            tokenizer,
            templates.final_answer,
            ("question", "memory"),
            templates.system,
            name="final_answer template",
            chat_template_kwargs=kw,
        )
        return cls(update=update, final=final, initial_memory=tuple(encode_text(tokenizer, templates.initial_memory)))


@dataclasses.dataclass(frozen=True)
class _Slot:
    name: str


def _control_splitter(tokenizer):
    """A function cutting template text at the tokenizer's control tokens -> [text, id, text, ..., text], as the
    tokenizer itself cuts its input (longest spelling first; lstrip / rstrip tokens take the whitespace beside
    them, single-word tokens match whole words only)."""
    controls = control_token_ids(tokenizer)
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    by_text, patterns = {}, []
    content_of = {i: getattr(added[i], "content", str(added[i])) for i in controls if i in added}
    for token_id in sorted(content_of, key=lambda i: (-len(content_of[i]), i)):
        token, content = added[token_id], content_of[token_id]
        by_text[content] = token_id
        body = re.escape(content)
        if getattr(token, "single_word", False):
            body = rf"(?<!\w){body}(?!\w)"
        patterns.append(
            (r"\s*" if getattr(token, "lstrip", False) else "")
            + f"({body})"
            + (r"\s*" if getattr(token, "rstrip", False) else "")
        )
    if not patterns:
        return lambda text: [text]
    pattern = re.compile("|".join(patterns))

    def split(text: str) -> list:
        out, pos = [], 0
        for m in pattern.finditer(text):
            content = next(g for g in m.groups() if g is not None)
            out += [text[pos : m.start()], by_text[content]]
            pos = m.end()
        out.append(text[pos:])
        return out

    return split


class TextPrompter:
    """Text-mode prompts (host side): fill the template with text, apply the chat template, tokenize once.

        p = TextPrompter(tokenizer, AgentTemplates.from_file("templates.json"))
        p.update_text(question, memory, chunk)   # the string the reference tokenizes whole
        p.update_ids(question, memory, chunk)    # its token ids
        p.final_ids(question, memory)
        p.update_ids_batch([(question, memory, chunk), ...])   # many prompts, one tokenizer call

    The chat template's own control tokens (e.g. <|im_start|>) become their ids; the question, memory and chunk
    text is read as plain text, so a control token they spell stays text. For text that spells none, the ids are
    exactly ``tokenizer(update_text(...), add_special_tokens=False)``, as in the reference.
    """

    def __init__(self, tokenizer, templates: AgentTemplates = AgentTemplates()):
        self.tokenizer = tokenizer
        self.templates = templates
        split = _control_splitter(tokenizer)
        self._update = self._runs(split, templates.memory_update, UPDATE_SLOTS, "memory_update template")
        self._final = self._runs(split, templates.final_answer, FINAL_SLOTS, "final_answer template")

    def _runs(self, split, template: str, slots, name: str) -> tuple:
        """The prompt as control token ids and runs of text (literal strings and slots) between them."""
        t = self.templates
        literal = literal_pieces(
            self.tokenizer, template, slots, t.system, name=name, chat_template_kwargs=t.chat_template_kwargs
        )
        items: list = []
        for i, piece in enumerate(literal):
            parts = split(piece)
            expected = [tok for p in parts for tok in ([p] if isinstance(p, int) else encode_text(self.tokenizer, p))]
            if expected != encode_template(self.tokenizer, piece):
                raise TemplateError(
                    f"{name}: text prompt mode cannot separate this tokenizer's control tokens from the text of its "
                    f"chat template ({piece!r} tokenizes differently when cut at them); use prompt_mode='pieces'"
                )
            items += parts
            if i < len(slots):
                items.append(_Slot(slots[i]))
        runs, run = [], []
        for item in items:
            if isinstance(item, int):
                runs += [tuple(run), item]
                run = []
            elif item != "":
                run.append(item)
        runs.append(tuple(run))
        return tuple(r for r in runs if r != ())

    def _ids_batch(self, runs, rows: Sequence[Mapping[str, str]]) -> list[list[int]]:
        texts, plans = [], []
        for values in rows:
            plan = []
            for run in runs:
                if isinstance(run, int):
                    plan.append(run)
                else:
                    text = "".join(values[p.name] if isinstance(p, _Slot) else p for p in run)
                    if text:
                        plan.append(("text", len(texts)))
                        texts.append(text)
            plans.append(plan)
        encoded = encode_plain_batch(self.tokenizer, texts)
        out = []
        for plan in plans:
            ids: list[int] = []
            for step in plan:
                if isinstance(step, int):
                    ids.append(step)
                else:
                    ids.extend(encoded[step[1]])
            out.append(ids)
        return out

    def _text(self, template: str, slots, values) -> str:
        t = self.templates
        return _render(self.tokenizer, fill_template(template, slots, values), t.system, t.chat_template_kwargs)

    def update_text(self, question: str, memory: str, chunk: str) -> str:
        return self._text(
            self.templates.memory_update, UPDATE_SLOTS, {"question": question, "memory": memory, "chunk": chunk}
        )

    def final_text(self, question: str, memory: str) -> str:
        return self._text(self.templates.final_answer, FINAL_SLOTS, {"question": question, "memory": memory})

    def update_ids_batch(self, rows: Sequence[tuple[str, str, str]]) -> list[list[int]]:
        """Prompt ids of many (question, memory, chunk) rows."""
        return self._ids_batch(self._update, [dict(zip(UPDATE_SLOTS, row)) for row in rows])

    def final_ids_batch(self, rows: Sequence[tuple[str, str]]) -> list[list[int]]:
        """Prompt ids of many (question, memory) rows."""
        return self._ids_batch(self._final, [dict(zip(FINAL_SLOTS, row)) for row in rows])

    def update_ids(self, question: str, memory: str, chunk: str) -> list[int]:
        return self.update_ids_batch([(question, memory, chunk)])[0]

    def final_ids(self, question: str, memory: str) -> list[int]:
        return self.final_ids_batch([(question, memory)])[0]


def pad_to(ids: Sequence[int], size: int, pad_id: int = 0) -> tuple[np.ndarray, int]:
    """Right-pads `ids` to `size` -> (array [size] int32, real length)."""
    if len(ids) > size:
        raise ValueError(f"{len(ids)} tokens do not fit a slot of {size}")
    out = np.full((size,), pad_id, np.int32)
    out[: len(ids)] = ids
    return out, len(ids)
