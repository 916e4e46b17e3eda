"""Human-readable memory reports: what the agent read at every chunk, what it kept, and how it answered.

    entries = entries_from_agent(tokenizer, result, records, doc_ids, budgets.chunk_tokens, model="qwen-7b")
    write_trace_report("out/trace", entries, title="RULER-HotpotQA, 200 docs")   # out/trace.md, out/trace.html

One section per question. For every chunk step the report shows the chunk's key content, the memory
after the step and whether it changed, then the answer and the verdict:

* **Key content of a chunk**: its sentences that matter, chosen generically: a sentence containing a gold
  answer (after the evaluation's SQuAD normalisation), or sharing a *rare content word* with the
  question (not a stop word, at least 3 characters or containing a digit, and found in at most
  max(3, 2 %) of the document's sentences, so that words repeated all over the document do not count).
  Each shown sentence says why it was chosen; gold answers and question words are highlighted in HTML.
  A chunk with none shows its sentence count and a short elided excerpt:
  ``6 sentences, none relevant: 'The quiet river…'``.
* **Memory**: the text after the step, marked *changed* or *kept* (compared with the memory before the
  step; the first step compares with `TraceEntry.initial_memory` when given), and which gold answers it
  contains.
* **Long documents**: every step where something relevant is in the chunk or the memory changed is shown;
  runs of other steps collapse into one line, e.g. ``steps 12-40: nothing relevant, memory kept``.

Both files are self-contained: the Markdown puts all document/model text in code spans or fenced blocks
(so no renderer interprets it as HTML or Markdown), the HTML escapes every piece of text and carries its
own small stylesheet (no scripts, no external resources).

This module imports nothing from JAX (the verifier only); `entries_from_agent` takes the agent's result,
tokenizer and token ids duck-typed.
"""

from __future__ import annotations

import dataclasses
import html
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from memagent_jax.evaluation import verifier

__all__ = [
    "TraceEntry",
    "StepView",
    "analyse_entry",
    "entries_from_agent",
    "render_html",
    "render_markdown",
    "write_trace_report",
]

#: Words never counted as content words when matching a question against a chunk.
STOP_WORDS = frozenset(
    """
a about above after again against all also am an and any are as at be because been before being below
between both but by can could did do does doing down during each few for from further had has have having
he her here hers herself him himself his how i if in into is it its itself just me more most my myself no
nor not now of off on once only or other our ours ourselves out over own same she should so some such than
that the their theirs them themselves then there these they this those through to too under until up very
was we were what when where which while who whom whose why will with would you your yours yourself
yourselves name named called many much one two first last also did does was were year years
""".split()
)

MAX_SENTENCES_SHOWN = 8  # relevant sentences shown per step (the rest are counted)
SENTENCE_WIDTH = 320  # longer sentences are clipped around their first highlighted term
EXCERPT_WIDTH = 60  # the excerpt of a chunk with nothing relevant

_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+|\n+")
_WORD = re.compile(r"[^\W_]+")
_INITIAL = re.compile(r"\(?[A-Z]\.")
_ABBREVIATIONS = frozenset(
    "mr. mrs. ms. dr. prof. st. jr. sr. vs. no. vol. pp. fig. e.g. i.e. approx. inc. "
    "ltd. co. corp. mt. ft. gen. gov. sen. rep. rev. u.s.".split()
)


@dataclasses.dataclass
class TraceEntry:
    """One question's trajectory, as text.

    model: the model's name or path. question, answers (the gold answers). chunks: the text of every chunk
    read (one per step); memories: the memory text after each step (same length). prediction: the final
    answer text; correct: the verdict; metric: an optional score (named `metric_name`). initial_memory: the
    memory before the first step (optional: with it the first step can be "kept"). label: an optional id
    shown in the heading (row, record index).
    """

    model: str
    question: str
    answers: list[str]
    chunks: list[str]
    memories: list[str]
    prediction: str
    correct: bool
    metric: float | None = None
    metric_name: str = "sub_em"
    initial_memory: str | None = None
    label: str = ""

    def __post_init__(self):
        if isinstance(self.answers, str):
            self.answers = [self.answers]
        self.answers = [str(a) for a in self.answers]
        self.chunks = list(self.chunks)
        self.memories = list(self.memories)
        if len(self.chunks) != len(self.memories):
            raise ValueError(f"{len(self.chunks)} chunks but {len(self.memories)} memories: one memory per chunk step")


# --------------------------------------------------------------------------------------------- analysis


@dataclasses.dataclass
class Sentence:
    """A relevant sentence: its text, the gold answers and the rare question words it contains."""

    text: str
    gold: list[str]
    words: list[str]


@dataclasses.dataclass
class StepView:
    """What the report shows of one step (1-based `step`)."""

    step: int
    num_sentences: int
    relevant: list[Sentence]
    excerpt: str
    memory: str
    changed: bool
    memory_gold: list[str]

    @property
    def eventful(self) -> bool:
        return bool(self.relevant) or self.changed


def _sentences(text: str) -> list[str]:
    """Sentences of a text: split after . ! ? and at line breaks, not after abbreviations and initials
    ("Mr.", "St.", "J.")."""
    out: list[str] = []
    glue = False
    for piece in _SENTENCE_SPLIT.split(text):
        piece = piece.strip()
        if not piece:
            glue = False
            continue
        if glue and out:
            out[-1] += " " + piece
        else:
            out.append(piece)
        last = piece.rsplit(None, 1)[-1]
        glue = last.lower() in _ABBREVIATIONS or bool(_INITIAL.fullmatch(last))
    return out


def _words(text: str) -> set[str]:
    return set(_WORD.findall(text.lower()))


def _is_content(word: str) -> bool:
    return word not in STOP_WORDS and (len(word) >= 3 or any(c.isdigit() for c in word))


def _padded_norm(text: str) -> str:
    return f" {verifier.normalize_answer(text)} "


def _golds_in(text_norm: str, golds: list[tuple[str, str]]) -> list[str]:
    """Gold answers whose normalised form occurs as whole words in `text_norm` (a padded normalised text)."""
    return [gold for gold, norm in golds if norm and f" {norm} " in text_norm]


def analyse_entry(entry: TraceEntry) -> list[StepView]:
    """Per step: relevant sentences (or an excerpt), memory change and gold answers in memory."""
    golds = [(g, verifier.normalize_answer(g)) for g in entry.answers]
    chunk_sentences = [_sentences(c) for c in entry.chunks]
    document_frequency: Counter = Counter()
    total = 0
    for sentences in chunk_sentences:
        for s in sentences:
            document_frequency.update(_words(s))
            total += 1
    limit = max(3, math.ceil(0.02 * total))
    question_words = {w for w in _words(entry.question) if _is_content(w)}
    rare = {w for w in question_words if document_frequency[w] <= limit}

    views = []
    previous = entry.initial_memory
    for k, (sentences, memory) in enumerate(zip(chunk_sentences, entry.memories)):
        relevant = []
        for s in sentences:
            gold = _golds_in(_padded_norm(s), golds)
            words = sorted(rare & _words(s))
            if gold or words:
                relevant.append(Sentence(text=s, gold=gold, words=words))
        excerpt = "" if relevant or not sentences else _elide(sentences[0], EXCERPT_WIDTH)
        views.append(
            StepView(
                step=k + 1,
                num_sentences=len(sentences),
                relevant=relevant,
                excerpt=excerpt,
                memory=memory,
                changed=previous is None or memory != previous,
                memory_gold=_golds_in(_padded_norm(memory), golds),
            )
        )
        previous = memory
    return views


def _elide(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1].rstrip() + "\u2026"


def _clip(text: str, pattern: re.Pattern | None, width: int = SENTENCE_WIDTH) -> str:
    """`text` on one line, clipped to about `width` characters around the first match of `pattern`."""
    text = " ".join(text.split())
    if len(text) <= width:
        return text
    m = pattern.search(text) if pattern is not None else None
    centre = (m.start() + m.end()) // 2 if m else 0
    start = max(0, min(centre - width // 2, len(text) - width))
    end = start + width
    return ("\u2026" if start > 0 else "") + text[start:end].strip() + ("\u2026" if end < len(text) else "")


def _term_pattern(golds: Iterable[str], words: Iterable[str]) -> re.Pattern | None:
    """One case-insensitive pattern for highlighting: group 'gold' for gold answers, 'word' for question words."""
    gold_terms = sorted({g.strip() for g in golds if g.strip()}, key=len, reverse=True)
    word_terms = sorted(set(words), key=len, reverse=True)
    parts = []
    if gold_terms:
        parts.append("(?P<gold>" + "|".join(_bounded(g) for g in gold_terms) + ")")
    if word_terms:
        parts.append(r"(?P<word>\b(?:" + "|".join(re.escape(w) for w in word_terms) + r")\b)")
    return re.compile("|".join(parts), re.IGNORECASE) if parts else None


def _bounded(term: str) -> str:
    pre = r"\b" if term[0].isalnum() else ""
    post = r"\b" if term[-1].isalnum() else ""
    return pre + re.escape(term) + post


# --------------------------------------------------------------------------------------------- summary


@dataclasses.dataclass
class _Summary:
    entry: TraceEntry
    views: list[StepView]

    @property
    def relevant_steps(self) -> list[int]:
        return [v.step for v in self.views if v.relevant]

    @property
    def gold_steps(self) -> list[int]:
        return [v.step for v in self.views if any(s.gold for s in v.relevant)]

    @property
    def first_gold_in_memory(self) -> int | None:
        return next((v.step for v in self.views if v.memory_gold), None)

    @property
    def final_memory_gold(self) -> bool:
        return bool(self.views and self.views[-1].memory_gold)

    def blocks(self):
        """('step', view) for shown steps and ('run', [views]) for collapsed runs of uneventful steps."""
        run: list[StepView] = []
        for v in self.views:
            if v.eventful:
                if run:
                    yield "run", run
                    run = []
                yield "step", v
            else:
                run.append(v)
        if run:
            yield "run", run


def _steps_label(steps: Sequence[int], limit: int = 12) -> str:
    if not steps:
        return "none"
    shown = ", ".join(str(s) for s in steps[:limit])
    return shown + (f", \u2026 ({len(steps)} in all)" if len(steps) > limit else "")


def _run_line(run: list[StepView]) -> str:
    a, b = run[0].step, run[-1].step
    where = f"step {a}" if a == b else f"steps {a}-{b}"
    line = f"{where}: nothing relevant, memory kept"
    if run[-1].memory_gold:
        line += " (it holds the gold answer)"
    return line


def _verdict(entry: TraceEntry) -> str:
    verdict = "correct" if entry.correct else "wrong"
    if entry.metric is not None:
        verdict += f" ({entry.metric_name} {entry.metric:.2f})"
    return verdict


def _chunk_status(view: StepView) -> str:
    if view.relevant:
        return f"{len(view.relevant)} of {view.num_sentences} sentences relevant"
    if view.num_sentences == 0:
        return "empty chunk"
    return f"{view.num_sentences} sentence{'s' if view.num_sentences != 1 else ''}, none relevant"


def _memory_status(view: StepView) -> str:
    status = "memory changed" if view.changed else "memory kept"
    if view.memory_gold:
        status += ", holds the gold answer"
    return status


def _why(sentence: Sentence) -> str:
    parts = []
    if sentence.gold:
        parts.append("gold answer: " + ", ".join(sentence.gold))
    if sentence.words:
        parts.append("question words: " + ", ".join(sentence.words))
    return "; ".join(parts)


# --------------------------------------------------------------------------------------------- Markdown


def _md_code(text: str, *, table: bool = False) -> str:
    """`text` on one line as a code span (rendered verbatim: no HTML, no Markdown); in a table cell `|` is
    escaped (GFM tables split cells before parsing code spans)."""
    text = " ".join(text.split())
    if table:
        text = text.replace("|", "\\|")
    if not text:
        return "*(empty)*"
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _blank(text: str) -> str | None:
    """A description of an empty or whitespace-only text (None for any other text)."""
    if not text:
        return "(empty)"
    if not text.strip():
        return f"(only whitespace: {len(text)} character{'s' if len(text) != 1 else ''} {text!r})"
    return None


def _md_block(text: str) -> str:
    if _blank(text):
        return f"*{_md_plain(_blank(text))}*"
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


def render_markdown(entries: Sequence[TraceEntry], *, title: str) -> str:
    summaries = [_Summary(e, analyse_entry(e)) for e in entries]
    out = [f"# {_md_plain(title)}", ""]
    out += _md_overview(summaries)
    for i, s in enumerate(summaries, 1):
        out += _md_entry(i, s)
    return "\n".join(out).rstrip() + "\n"


def _md_plain(text: str) -> str:
    """Text outside code spans: one line, Markdown/HTML specials backslash-escaped."""
    return re.sub(r"([\\`*_\[\]<>#|&])", r"\\\1", " ".join(text.split()))


def _md_overview(summaries: list[_Summary]) -> list[str]:
    n = len(summaries)
    correct = sum(s.entry.correct for s in summaries)
    out = [
        f"{n} question{'s' if n != 1 else ''}, {correct} correct" + (f" ({100 * correct / n:.1f}%)" if n else "") + ".",
        "",
    ]
    if not n:
        return out
    out += [
        "| # | question | model | verdict | steps | gold in chunk at step | gold in final memory |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, s in enumerate(summaries, 1):
        out.append(
            f"| [{i}](#q{i}) | {_md_code(_elide(s.entry.question, 80), table=True)} | "
            f"{_md_code(s.entry.model, table=True)} | {_verdict(s.entry)} | {len(s.views)} | "
            f"{_steps_label(s.gold_steps, 5)} | {'yes' if s.final_memory_gold else 'no'} |"
        )
    out.append("")
    for group in _same_question_groups(summaries):
        out += _md_side_by_side(group)
    return out


def _same_question_groups(summaries: list[_Summary]) -> list[list[_Summary]]:
    """Entries of two or more models on the same question and document, in first-seen order."""
    groups: dict[tuple, list[_Summary]] = {}
    for s in summaries:
        groups.setdefault((s.entry.question, tuple(s.entry.answers), len(s.views)), []).append(s)
    return [g for g in groups.values() if len({s.entry.model for s in g}) > 1]


def _side_by_side_rows(group: list[_Summary]) -> list[tuple[str, str, list[str]]]:
    """Per step where a chunk is relevant or any model's memory changed: (step, relevant sentences, memory per
    model, marked '(kept)' or '(changed)'), then the answers."""
    rows = []
    for k, first in enumerate(group[0].views):
        views = [s.views[k] for s in group]
        if not (first.relevant or any(v.changed for v in views)):
            continue
        chunk = " / ".join(sentence.text for sentence in first.relevant[:MAX_SENTENCES_SHOWN]) or "(nothing relevant)"
        rows.append((str(first.step), chunk, [f"{v.memory} ({'changed' if v.changed else 'kept'})" for v in views]))
    rows.append(("answer", "", [f"{s.entry.prediction} ({_verdict(s.entry)})" for s in group]))
    return rows


def _md_side_by_side(group: list[_Summary]) -> list[str]:
    models = [s.entry.model for s in group]
    out = [
        f"### Side by side: {_md_plain(_elide(group[0].entry.question, 100))} "
        f"(gold: {' / '.join(_md_code(a) for a in group[0].entry.answers)})",
        "",
        "Steps where a chunk holds a relevant sentence or a memory changed; the other steps kept every memory.",
        "",
        "| step | relevant sentences of the chunk | " + " | ".join(_md_code(m, table=True) for m in models) + " |",
        "|---|---|" + "---|" * len(models),
    ]
    for step, chunk, memories in _side_by_side_rows(group):
        out.append(
            f"| {step} | {_md_code(_elide(chunk, 160), table=True) if chunk else ''} | "
            + " | ".join(_md_code(_elide(m, 80), table=True) for m in memories)
            + " |"
        )
    return out + [""]


def _md_entry(i: int, s: _Summary) -> list[str]:
    e = s.entry
    label = f" ({_md_plain(e.label)})" if e.label else ""
    out = [
        f'<a id="q{i}"></a>',
        "",
        f"## {i}. {_md_plain(_elide(e.question, 120))}{label}",
        "",
        f"- question: {_md_code(e.question)}",
        f"- gold answers: {' / '.join(_md_code(a) for a in e.answers) or '*(none)*'}",
        f"- model: {_md_code(e.model)}",
        f"- chunks read: {len(s.views)}; relevant chunks at steps: {_steps_label(s.relevant_steps)}; "
        f"a gold answer in a chunk at steps: {_steps_label(s.gold_steps)}",
        f"- gold answer first in memory at step: {s.first_gold_in_memory or 'never'}; "
        f"in the final memory: {'yes' if s.final_memory_gold else 'no'}",
        f"- verdict: **{_verdict(e)}**",
        "",
    ]
    if e.initial_memory is not None:
        out += ["Initial memory:", "", _md_block(e.initial_memory), ""]
    out += ["### Steps", ""]
    last_collapsed = False
    for kind, item in s.blocks():
        if kind == "run":
            out += [f"*{_run_line(item)}*", ""]
            last_collapsed = item[-1] is s.views[-1]
            continue
        v = item
        out += [f"#### Step {v.step} of {len(s.views)}: {_chunk_status(v)}; {_memory_status(v)}", ""]
        if v.relevant:
            for sentence in v.relevant[:MAX_SENTENCES_SHOWN]:
                pattern = _term_pattern(sentence.gold, sentence.words)
                out.append(f"- [{_md_plain(_why(sentence))}] {_md_code(_clip(sentence.text, pattern))}")
            if len(v.relevant) > MAX_SENTENCES_SHOWN:
                out.append(f"- \u2026 and {len(v.relevant) - MAX_SENTENCES_SHOWN} more relevant sentences")
        elif v.num_sentences:
            out.append(f"Chunk: {_chunk_status(v)}: {_md_code(_quoted(v.excerpt))}")
        else:
            out.append("Chunk: empty")
        gold = f"; holds gold: {', '.join(_md_code(g) for g in v.memory_gold)}" if v.memory_gold else ""
        out += [
            "",
            f"Memory after step {v.step} ({'changed' if v.changed else 'kept'}{gold}):",
            "",
            _md_block(v.memory),
            "",
        ]
    if last_collapsed and s.views:
        out += ["Final memory (the answer's only input):", "", _md_block(s.views[-1].memory), ""]
    out += ["### Answer", "", _md_block(e.prediction), "", f"Verdict: **{_verdict(e)}**", ""]
    return out


def _quoted(excerpt: str) -> str:
    return f"'{excerpt}'"


# --------------------------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;
color:#1d1d1f;line-height:1.45}
h1{font-size:1.6em}h2{margin-top:2em;border-bottom:2px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;font-size:.92em}td,th{border:1px solid #ddd;padding:.3em .5em;text-align:left;
vertical-align:top}
.meta{list-style:none;padding-left:0}.meta li{margin:.15em 0}
.step{border-left:4px solid #ccc;margin:1em 0;padding:.2em .8em}
.step.changed{border-left-color:#3b82f6}.step.holds-gold{background:#f3fbf3}
.step h4{margin:.3em 0;font-size:1em}
.collapsed{color:#666;font-style:italic;margin:.6em 0 .6em 1em}
pre{white-space:pre-wrap;word-wrap:break-word;background:#f6f6f6;padding:.5em .7em;border-radius:4px;margin:.3em 0}
pre.changed{border-left:3px solid #3b82f6}pre.kept{border-left:3px solid #bbb;color:#444}
.tag{display:inline-block;font-size:.8em;padding:0 .4em;border-radius:3px;margin-right:.4em;background:#eee}
.tag.gold{background:#fde68a}.tag.word{background:#dbeafe}.tag.changed{background:#dbeafe}
.tag.kept{background:#eee}.tag.has-gold{background:#bbf7d0}
mark.gold{background:#fde68a}mark.word{background:#dbeafe}
.verdict{font-weight:bold;padding:.1em .5em;border-radius:3px}
.verdict.correct{background:#bbf7d0}.verdict.wrong{background:#fecaca}
.excerpt{color:#555}
"""


def _esc(text: str) -> str:
    return html.escape(text, quote=True)


def _highlight(text: str, pattern: re.Pattern | None) -> str:
    """Escaped `text` with gold answers / question words wrapped in <mark>."""
    if pattern is None:
        return _esc(text)
    out, pos = [], 0
    for m in pattern.finditer(text):
        if m.start() == m.end():
            continue
        out.append(_esc(text[pos : m.start()]))
        kind = "gold" if "gold" in pattern.groupindex and m.group("gold") is not None else "word"
        out.append(f'<mark class="{kind}">{_esc(m.group(0))}</mark>')
        pos = m.end()
    out.append(_esc(text[pos:]))
    return "".join(out)


def _pre(text: str, pattern: re.Pattern | None) -> str:
    blank = _blank(text)
    return f"<em>{_esc(blank)}</em>" if blank else _highlight(text, pattern)


def _verdict_html(entry: TraceEntry) -> str:
    cls = "correct" if entry.correct else "wrong"
    return f'<span class="verdict {cls}">{_esc(_verdict(entry))}</span>'


def render_html(entries: Sequence[TraceEntry], *, title: str) -> str:
    summaries = [_Summary(e, analyse_entry(e)) for e in entries]
    n = len(summaries)
    correct = sum(s.entry.correct for s in summaries)
    out = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_esc(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        f"<h1>{_esc(title)}</h1>",
        f"<p>{n} question{'s' if n != 1 else ''}, {correct} correct"
        + (f" ({100 * correct / n:.1f}%)" if n else "")
        + ".</p>",
    ]
    if n:
        out.append(
            "<table><tr><th>#</th><th>question</th><th>model</th><th>verdict</th><th>steps</th>"
            "<th>gold in chunk at step</th><th>gold in final memory</th></tr>"
        )
        for i, s in enumerate(summaries, 1):
            out.append(
                f'<tr><td><a href="#q{i}">{i}</a></td><td>{_esc(_elide(s.entry.question, 100))}</td>'
                f"<td><code>{_esc(s.entry.model)}</code></td>"
                f"<td>{_verdict_html(s.entry)}</td><td>{len(s.views)}</td>"
                f"<td>{_esc(_steps_label(s.gold_steps, 5))}</td>"
                f"<td>{'yes' if s.final_memory_gold else 'no'}</td></tr>"
            )
        out.append("</table>")
    for group in _same_question_groups(summaries):
        out.append(
            f"<h3>Side by side: {_esc(group[0].entry.question)} (gold: "
            f"{_esc(' / '.join(group[0].entry.answers))})</h3><table><tr><th>step</th>"
            "<th>relevant sentences of the chunk</th>"
            + "".join(f"<th>{_esc(s.entry.model)}</th>" for s in group)
            + "</tr>"
        )
        for step, chunk, memories in _side_by_side_rows(group):
            out.append(
                f"<tr><td>{_esc(step)}</td><td>{_esc(chunk)}</td>"
                + "".join(f"<td><code>{_esc(m)}</code></td>" for m in memories)
                + "</tr>"
            )
        out.append("</table>")
    for i, s in enumerate(summaries, 1):
        out += _html_entry(i, s)
    out += ["</body>", "</html>"]
    return "\n".join(out) + "\n"


def _html_entry(i: int, s: _Summary) -> list[str]:
    e = s.entry
    label = f" ({_esc(e.label)})" if e.label else ""
    gold_pattern = _term_pattern(e.answers, ())
    answers = " / ".join(f"<code>{_esc(a)}</code>" for a in e.answers) or "<em>(none)</em>"
    out = [
        f'<section id="q{i}">',
        f"<h2>{i}. {_esc(e.question)}{label}</h2>",
        '<ul class="meta">',
        f"<li>gold answers: {answers}</li>",
        f"<li>model: <code>{_esc(e.model)}</code></li>",
        f"<li>chunks read: {len(s.views)}; relevant chunks at steps: {_esc(_steps_label(s.relevant_steps))}; "
        f"a gold answer in a chunk at steps: {_esc(_steps_label(s.gold_steps))}</li>",
        f"<li>gold answer first in memory at step: {s.first_gold_in_memory or 'never'}; in the final memory: "
        f"{'yes' if s.final_memory_gold else 'no'}</li>",
        f"<li>verdict: {_verdict_html(e)}</li>",
        "</ul>",
    ]
    if e.initial_memory is not None:
        out.append(f'<p>Initial memory:</p><pre class="kept">{_pre(e.initial_memory, None)}</pre>')
    last_collapsed = False
    for kind, item in s.blocks():
        if kind == "run":
            out.append(f'<p class="collapsed">{_esc(_run_line(item))}</p>')
            last_collapsed = item[-1] is s.views[-1]
            continue
        v = item
        classes = "step" + (" changed" if v.changed else "") + (" holds-gold" if v.memory_gold else "")
        state = "changed" if v.changed else "kept"
        out.append(f'<div class="{classes}">')
        out.append(f"<h4>Step {v.step} of {len(s.views)}: {_esc(_chunk_status(v))}</h4>")
        if v.relevant:
            out.append("<ul>")
            for sentence in v.relevant[:MAX_SENTENCES_SHOWN]:
                pattern = _term_pattern(sentence.gold, sentence.words)
                tags = "".join(f'<span class="tag gold">gold: {_esc(g)}</span>' for g in sentence.gold)
                if sentence.words:
                    tags += f'<span class="tag word">question words: {_esc(", ".join(sentence.words))}</span>'
                out.append(f"<li>{tags}{_highlight(_clip(sentence.text, pattern), pattern)}</li>")
            if len(v.relevant) > MAX_SENTENCES_SHOWN:
                out.append(f"<li>\u2026 and {len(v.relevant) - MAX_SENTENCES_SHOWN} more relevant sentences</li>")
            out.append("</ul>")
        elif v.num_sentences:
            out.append(f'<p class="excerpt">{_esc(_chunk_status(v))}: {_esc(_quoted(v.excerpt))}</p>')
        tags = f'<span class="tag {state}">memory {state}</span>'
        if v.memory_gold:
            tags += f'<span class="tag has-gold">holds gold: {_esc(", ".join(v.memory_gold))}</span>'
        out.append(f"<p>Memory after step {v.step}: {tags}</p>")
        out.append(f'<pre class="{state}">{_pre(v.memory, gold_pattern)}</pre>')
        out.append("</div>")
    if last_collapsed and s.views:
        out.append(
            f"<p>Final memory (the answer's only input):</p>"
            f'<pre class="kept">{_pre(s.views[-1].memory, gold_pattern)}</pre>'
        )
    out += [
        "<h3>Answer</h3>",
        f"<pre>{_pre(e.prediction, gold_pattern)}</pre>",
        f"<p>Verdict: {_verdict_html(e)}</p>",
        "</section>",
    ]
    return out


# --------------------------------------------------------------------------------------------- files

_RENDERERS = {"md": render_markdown, "html": render_html}


def write_trace_report(
    path_stem: str | os.PathLike, entries: Sequence[TraceEntry], *, title: str, formats: Sequence[str] = ("md", "html")
) -> list[str]:
    """Writes `<path_stem>.md` and/or `<path_stem>.html` (UTF-8); returns the paths written."""
    unknown = [f for f in formats if f not in _RENDERERS]
    if unknown:
        raise ValueError(f"unknown report format(s) {unknown}; choose from {sorted(_RENDERERS)}")
    path_stem = os.fspath(path_stem)
    parent = os.path.dirname(os.path.abspath(path_stem))
    os.makedirs(parent, exist_ok=True)
    written = []
    for fmt in formats:
        path = f"{path_stem}.{fmt}"
        text = _RENDERERS[fmt](list(entries), title=title)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        written.append(path)
    return written


# --------------------------------------------------------------------------------------------- agent glue


def _record_fields(record: Any) -> tuple[str, list[str], str]:
    """(question, answers, label) of a QARecord-like object, a mapping, or a (question, answers) pair."""
    if isinstance(record, Mapping):
        question = record.get("question", record.get("input"))
        answers = record.get("answers")
        if answers is None:
            answers = (record.get("reward_model") or {}).get("ground_truth")
        index = record.get("index")
    elif isinstance(record, (tuple, list)) and len(record) == 2:
        (question, answers), index = record, None
    else:
        question, answers, index = (
            getattr(record, "question", None),
            getattr(record, "answers", None),
            getattr(record, "index", None),
        )
    if not isinstance(question, str):
        raise ValueError(f"cannot read a question from {type(record).__name__} {record!r:.80}")
    if answers is None:
        answers = []
    elif isinstance(answers, str):
        answers = [answers]
    return question, [str(a) for a in answers], "" if index is None else f"index {index}"


def entries_from_agent(
    tokenizer,
    result,
    records: Sequence[Any],
    doc_ids: Sequence[Sequence[int]],
    chunk_tokens: int,
    *,
    model: str = "",
    metric: str = "sub_em",
    extract: str = "boxed",
    correct: Sequence[bool] | None = None,
    initial_memory: str | None = None,
) -> list[TraceEntry]:
    """TraceEntry objects from an `AgentResult` run with `trace=True`.

    Args:
      tokenizer: the agent's tokenizer (chunks are decoded with it).
      result: the AgentResult (`answers`, `traces`, `num_chunks` are used).
      records: per row, a QARecord (or a mapping with question/input and answers, or a (question, answers)
        pair).
      doc_ids: per row, the document token ids exactly as the agent read them (after centre truncation),
        e.g. `agent.prepare(question, document)[1]`.
      chunk_tokens: the agent's `budgets.chunk_tokens`.
      model: the model name shown in the report.
      metric, extract: how `verifier.score` scores each answer (the report's metric value).
      correct: per row verdicts; default: the metric value is 1.
      initial_memory: the memory text before the first step (`AgentTemplates.initial_memory`), so that a
        first step which keeps it shows as "kept".
    """
    traces = getattr(result, "traces", None)
    if traces is None:
        raise ValueError("the AgentResult has no traces: run the agent with trace=True")
    n = len(result.answers)
    if len(records) != n or len(doc_ids) != n:
        raise ValueError(f"{n} result rows but {len(records)} records and {len(doc_ids)} documents")
    if correct is not None and len(correct) != n:
        raise ValueError(f"{n} result rows but {len(correct)} verdicts")
    entries = []
    for i in range(n):
        question, answers, label = _record_fields(records[i])
        ids = [int(t) for t in doc_ids[i]]
        chunks = [tokenizer.decode(ids[k : k + chunk_tokens]) for k in range(0, len(ids), chunk_tokens)]
        if len(chunks) != len(traces[i]):
            raise ValueError(
                f"row {i}: {len(chunks)} chunks of {chunk_tokens} tokens but {len(traces[i])} memory "
                f"steps in the trace (wrong chunk_tokens, or ids not as the agent read them?)"
            )
        prediction = result.answers[i]
        value = verifier.score(prediction, answers, metric, extract) if answers else None
        verdict = bool(correct[i]) if correct is not None else value is not None and value >= 1.0
        entries.append(
            TraceEntry(
                model=model,
                question=question,
                answers=answers,
                chunks=chunks,
                memories=list(traces[i]),
                prediction=prediction,
                correct=verdict,
                metric=value,
                metric_name=metric,
                initial_memory=initial_memory,
                label=label or f"row {i}",
            )
        )
    return entries
