"""Rule-based answer verification: extraction, normalisation, metrics and the training reward.

Everything the trainer rewards and every accuracy the evaluator reports is computed here, so the
rules are spelled out in full:

* **Extraction.**  :func:`extract_boxed` returns the content of the *last complete*
  ``\\boxed{...}`` (or ``\\fbox{...}``) in a response, with nested braces matched.  "Last" means the
  command that starts last among those whose opening brace is closed again; an unclosed
  ``\\boxed{`` (a truncated generation) is skipped.  :func:`extract_answer_phrase` returns the rest
  of the line after the last "the answer is" (any case).
* **Normalisation** (:func:`normalize_answer`, SQuAD style): lower-case; delete punctuation (ASCII
  punctuation and every Unicode punctuation character); delete the whole words "a", "an", "the";
  collapse runs of whitespace to one space and strip.  It is idempotent.
* **Metrics** against several ground truths take the maximum over the ground truths:
  :func:`exact_match` (normalised strings equal), :func:`f1` (token-level F1 of the normalised
  strings), :func:`sub_exact_match` (normalised gold is a substring of the normalised prediction
  or the reverse; the QA "accuracy" of the reference work), and :func:`string_match_all` (fraction
  of references contained case-insensitively in the prediction; the RULER metric for non-QA
  tasks).  A prediction that normalises to the empty string scores 0 everywhere, and a ground
  truth that normalises to the empty string never matches, so an empty answer can never be
  "contained" in anything.
  :func:`f1` follows HotpotQA's rule for yes/no answers: when the normalised gold or the
  normalised prediction is ``yes``, ``no`` or ``noanswer``, F1 is 0 unless the two are equal.
* **Thinking.**  :func:`strip_think` keeps the text after the last ``</think>`` (a reasoning
  model's answer part).  Evaluation (:func:`extract_prediction`, :func:`score`) drops the thinking
  by default; the training reward keeps the whole response unless asked (``drop_think=True``).
* **Evaluation against the reference's.**  The reference evaluation (MemAgent's
  ``taskutils/memory_eval``) drops the thinking as :func:`strip_think` does, takes the last boxed
  answer, and scores EM / F1 / sub-EM with the same rules against ``answers[0]`` only.  Checked
  side by side on random corpora, the scores here are equal except in these cases: (1) the
  metrics take the best over *all* listed answers (identical on HotpotQA files, whose rows have
  one answer; it can only score higher on RULER ``qa_1`` rows with several SQuAD answers);
  (2) normalisation also deletes non-ASCII punctuation (curly quotes, dashes), which the
  reference keeps; (3) a prediction or gold that normalises to the empty string (e.g. "The")
  scores sub-EM 0 here, 1 there (the empty string is contained in everything); (4) when the
  last ``\\boxed{`` is never closed, the reference extracts nothing, here the previous complete
  box is taken; ``\\boxed x`` (a space, no brace) is read by the reference up to the next
  ``$`` and not at all here.
* **Reward** (:func:`reward`): 1.0 or 0.0 from the final response only; no format bonus.  Two
  families of styles (see :data:`REWARD_STYLES`):

  - ``"reference_boxed"`` reproduces the MemAgent training reward exactly
    (:func:`reference_boxed_reward`): only the last 300 characters of the response are searched,
    lower-cased, for the last ``\\boxed``; the answer and the ground truth are compared after a
    light normalisation that deletes spaces and newlines (plus a few LaTeX spellings) but keeps
    punctuation and articles.  ``\\boxed{The Hop-Frog}`` does *not* match ``Hop-Frog``.
  - ``"boxed_em"`` (the function default) and the others use this module's own extraction and the
    SQuAD normalisation above: ``\\boxed{The Hop-Frog}`` matches ``Hop-Frog``.

The module imports nothing from JAX (only the standard library and numpy).  Every function
accepts any ``str`` without raising, and runs in time linear in the length of its input, also on
adversarial text such as a megabyte of braces or backslashes.
"""

from __future__ import annotations

import collections
import re
import string
import sys
import unicodedata
from collections.abc import Iterable, Sequence

import numpy as np

__all__ = [
    "REWARD_STYLES",
    "METRICS",
    "extract_boxed",
    "extract_answer_phrase",
    "strip_think",
    "extract_prediction",
    "normalize_answer",
    "exact_match",
    "f1",
    "sub_exact_match",
    "string_match_all",
    "score",
    "reward",
    "reference_boxed_reward",
    "resolve_reward_style",
]

# ---------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------

# An opening command: "\boxed{" or "\fbox{", optionally with whitespace before the brace.  The
# whitespace run is bounded by the next non-space character, so matching stays linear.
_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)[ \t]*\{")

_OPEN_BRACE = ord("{")
_CLOSE_BRACE = ord("}")


def extract_boxed(text: str) -> str | None:
    """Return the content of the last complete ``\\boxed{...}`` / ``\\fbox{...}`` in ``text``.

    Braces nest: ``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``.  Among several boxed answers the
    one that *starts* last wins (so ``\\boxed{a \\boxed{b}}`` gives ``b``).  A command whose brace is
    never closed is ignored.  Escaped braces (``\\{``) count as braces, as in LaTeX source where they
    come in pairs.  The content is returned unstripped; returns ``None`` when there is no complete
    boxed answer or ``text`` is not a string.

    Runs in linear time: all brace depths are computed in one vectorised pass, and the candidate
    commands are examined with one segmented minimum (see the comments below).
    """
    if not isinstance(text, str) or ("\\boxed" not in text and "\\fbox" not in text):
        return None
    openers = [(m.start(), m.end() - 1) for m in _BOX_OPEN.finditer(text)]
    if not openers:
        return None
    base = openers[0][0]
    # Code points of the tail of the text from the first command on (utf-32 keeps indices = chars).
    codes = np.frombuffer(text[base:].encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    depth = np.cumsum((codes == _OPEN_BRACE).astype(np.int64) - (codes == _CLOSE_BRACE).astype(np.int64))
    n = len(codes)
    braces = np.fromiter((b - base for _, b in openers), dtype=np.int64, count=len(openers))
    # The brace at position b is closed by the first q > b with depth[q] < depth[b].  Let j be the
    # answer: the last command whose brace closes.  Every later brace never closes, and then j's
    # brace must close before the next brace b_{j+1} (if it closed after it, depth would stay above
    # depth[b_j] from b_{j+1} on, contradiction).  So it suffices to test each brace i for a close
    # inside its own segment (b_i, b_{i+1}) (the last one: to the end of the text) and take the last
    # i that passes: a pass means "really closes", and every brace after j fails.  The segment
    # minima come from one reduceat over [b_i + 1, b_{i+1}) segments; the interleaved one-element
    # segments [b_{i+1}, b_{i+1} + 1) are computed and discarded.  Segments are never empty except
    # possibly the last one (a brace at the very end), where a sentinel makes the test fail.
    depth_ext = np.concatenate([depth, [np.iinfo(np.int64).max]])
    bounds = np.empty(2 * len(braces), dtype=np.int64)
    bounds[0::2] = braces + 1
    bounds[1::2] = np.concatenate([braces[1:], [n]])
    seg_min = np.minimum.reduceat(depth_ext, bounds)[0::2]
    closed = seg_min < depth[braces]
    hits = np.flatnonzero(closed)
    if len(hits) == 0:
        return None
    i = int(hits[-1])
    b = int(braces[i])
    seg_end = int(bounds[2 * i + 1])
    q = b + 1 + int(np.argmax(depth[b + 1 : seg_end] < depth[b]))
    return text[base + b + 1 : base + q]


# "the answer is", any case, any whitespace between the words.
_ANSWER_PHRASE = re.compile(r"the\s+answer\s+is", re.IGNORECASE)
_PHRASE_STRIP = " \t\r\n:*\"'`"


def extract_answer_phrase(text: str) -> str | None:
    """Return the text after the last "the answer is" (any case), trimmed, or ``None``.

    The answer runs to the end of that line.  Trimming removes surrounding whitespace, a leading
    colon, markdown emphasis/quote characters and one trailing full stop.  Returns ``None`` when the
    phrase does not occur or nothing is left after trimming.
    """
    if not isinstance(text, str):
        return None
    last = None
    for last in _ANSWER_PHRASE.finditer(text):
        pass
    if last is None:
        return None
    rest = text[last.end() :]
    newline = rest.find("\n")
    if newline >= 0:
        rest = rest[:newline]
    rest = rest.strip(_PHRASE_STRIP)
    if rest.endswith("."):
        rest = rest[:-1].rstrip(_PHRASE_STRIP)
    return rest or None


THINK_END = "</think>"


def strip_think(text: str) -> str:
    """The answer part of a reasoning model's response: the text after the last ``</think>``.

    Rule (the reference evaluation's): a text without ``</think>`` is returned unchanged; otherwise
    the part after the last ``</think>``, stripped of surrounding whitespace.  When that part is
    empty (the model stopped right after thinking) the whole text is returned, as the reference
    does.  An opening ``<think>`` without its closing tag is kept (the text is returned unchanged).
    Non-strings are returned unchanged.
    """
    if not isinstance(text, str):
        return text
    cut = text.rfind(THINK_END)
    if cut < 0:
        return text
    tail = text[cut + len(THINK_END) :].strip()
    return tail if tail else text


#: Ways to turn a response into a prediction, for :func:`extract_prediction`.
EXTRACTORS = ("boxed", "answer_phrase", "boxed_or_phrase", "boxed_or_raw", "raw")


def extract_prediction(response: str, mode: str = "boxed", *, drop_think: bool = True) -> str | None:
    """Extract the predicted answer from a model response.

    ``mode``: ``"boxed"`` (last boxed answer), ``"answer_phrase"`` (after "the answer is"),
    ``"boxed_or_phrase"`` (boxed, else the answer phrase), ``"boxed_or_raw"`` (boxed, else the
    whole response) or ``"raw"`` (the whole response).  With ``drop_think`` (the default, as in
    the reference evaluation) the response is first cut to its answer part by
    :func:`strip_think`, so a box inside ``<think>...</think>`` is not scored.  Returns ``None``
    when nothing is found.  Raises ``ValueError`` for an unknown mode (a configuration error, not
    a model error).
    """
    if mode not in EXTRACTORS:
        raise ValueError(f"unknown extraction mode {mode!r}; choose one of {EXTRACTORS}")
    if not isinstance(response, str):
        return None
    if drop_think:
        response = strip_think(response)
    if mode == "raw":
        return response
    if mode == "answer_phrase":
        return extract_answer_phrase(response)
    boxed = extract_boxed(response)
    if boxed is not None or mode == "boxed":
        return boxed
    if mode == "boxed_or_phrase":
        return extract_answer_phrase(response)
    return response


def readable_answer(response: str, mode: str = "boxed", *, drop_think: bool = True) -> str | None:
    """The answer to show a user: :func:`extract_prediction` without surrounding white space (`\\boxed{ Ra}` ->
    "Ra"; every metric normalises white space, so scores are the same either way).  None when nothing is found."""
    prediction = extract_prediction(response, mode, drop_think=drop_think)
    return None if prediction is None else prediction.strip()


# ---------------------------------------------------------------------------------------------
# Normalisation and metrics
# ---------------------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(?:a|an|the)\b")
_PUNCT_TABLE: dict[int, None] | None = None


def _punct_table() -> dict[int, None]:
    """str.translate table deleting ASCII punctuation and all Unicode ``P*`` characters.

    Built once, on first use (one pass over the code points, about 0.2 s).
    """
    global _PUNCT_TABLE
    if _PUNCT_TABLE is None:
        table = {ord(c): None for c in string.punctuation}
        for cp in range(sys.maxunicode + 1):
            if unicodedata.category(chr(cp))[0] == "P":
                table[cp] = None
        _PUNCT_TABLE = table
    return _PUNCT_TABLE


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation: lower-case, drop punctuation and articles, collapse spaces.

    Punctuation is ASCII punctuation plus every Unicode character of a punctuation category
    (``P*``), so curly quotes and dashes go too; symbols such as ``$`` ``+`` ``<`` are in the ASCII
    set and go as well.  Articles are the whole words a/an/the.  Non-strings normalise to ``""``.

    >>> normalize_answer("  The  Eiffel-Tower!")
    'eiffeltower'
    """
    if not isinstance(text, str):
        return ""
    text = text.lower().translate(_punct_table())
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _as_list(ground_truths: str | Iterable[str] | None) -> list[str]:
    """Accept one string or any iterable of strings (lists, tuples, numpy arrays)."""
    if ground_truths is None:
        return []
    if isinstance(ground_truths, (str, bytes)):
        ground_truths = [ground_truths]
    out = []
    try:
        for g in ground_truths:
            if isinstance(g, bytes):
                g = g.decode("utf-8", "replace")
            if g is not None:
                out.append(g if isinstance(g, str) else str(g))
    except TypeError:  # not iterable: a single scalar
        out.append(str(ground_truths))
    return out


def exact_match(prediction: str | None, ground_truths: str | Iterable[str]) -> float:
    """1.0 if the normalised prediction equals some normalised ground truth (non-empty), else 0.0."""
    pred = normalize_answer(prediction) if prediction is not None else ""
    if not pred:
        return 0.0
    return float(any(pred == normalize_answer(g) for g in _as_list(ground_truths)))


def _f1_tokens(pred_tokens: Sequence[str], gold_tokens: Sequence[str]) -> float:
    if not pred_tokens or not gold_tokens:
        return 0.0
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


#: Answers that HotpotQA's F1 scores all-or-nothing (after normalisation).
YES_NO_ANSWERS = frozenset({"yes", "no", "noanswer"})


def _f1_one(pred: str, gold: str) -> float:
    """F1 of two normalised strings, with HotpotQA's yes/no/noanswer rule."""
    if (pred in YES_NO_ANSWERS or gold in YES_NO_ANSWERS) and pred != gold:
        return 0.0
    return _f1_tokens(pred.split(), gold.split())


def f1(prediction: str | None, ground_truths: str | Iterable[str]) -> float:
    """Maximum over ground truths of the token-level F1 between normalised strings.

    Tokens are the whitespace-separated words after :func:`normalize_answer`; the overlap counts
    repeated words with multiplicity.  Example: "the red car" vs "a red bus" -> tokens
    [red, car] vs [red, bus] -> P = R = 1/2 -> F1 = 0.5.

    HotpotQA's rule: when either normalised string is ``yes``, ``no`` or ``noanswer``
    (:data:`YES_NO_ANSWERS`) the F1 against that ground truth is 1 if the two are equal and 0
    otherwise, so "yes and others" vs "yes" scores 0 (not 0.5).
    """
    pred = normalize_answer(prediction) if prediction is not None else ""
    if not pred:
        return 0.0
    return max((_f1_one(pred, normalize_answer(g)) for g in _as_list(ground_truths)), default=0.0)


def sub_exact_match(prediction: str | None, ground_truths: str | Iterable[str]) -> float:
    """1.0 if a normalised ground truth is a substring of the normalised prediction or the reverse.

    Both must be non-empty after normalisation.  Containment is on characters, as in the reference
    evaluation, so "paris" matches "in paris france" and also "par".  This is the QA accuracy.
    """
    pred = normalize_answer(prediction) if prediction is not None else ""
    if not pred:
        return 0.0
    for g in _as_list(ground_truths):
        gold = normalize_answer(g)
        if gold and (gold in pred or pred in gold):
            return 1.0
    return 0.0


def string_match_all(prediction: str | None, references: str | Iterable[str]) -> float:
    """Fraction of references contained in the prediction, case-insensitively (RULER non-QA metric).

    Matching uses ``str.lower`` on both sides and no other normalisation.  An empty reference
    never counts as contained; no references at all scores 0.0.
    """
    refs = _as_list(references)
    if not refs or not isinstance(prediction, str):
        return 0.0
    pred = prediction.lower()
    hits = sum(1 for r in refs if r and r.lower() in pred)
    return hits / len(refs)


#: Metric name -> function(prediction, ground_truths) -> float.
METRICS = {
    "em": exact_match,
    "f1": f1,
    "sub_em": sub_exact_match,
    "string_match_all": string_match_all,
}


def score(
    response: str,
    ground_truths: str | Iterable[str],
    metric: str = "sub_em",
    extract: str = "boxed",
    *,
    drop_think: bool = True,
) -> float:
    """Evaluation score of one response: extract a prediction (see :func:`extract_prediction`;
    the thinking is dropped unless ``drop_think=False``) and apply ``metric`` (a key of
    :data:`METRICS`).  Nothing extracted scores 0.0."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {tuple(METRICS)}")
    pred = extract_prediction(response, extract, drop_think=drop_think)
    if pred is None:
        return 0.0
    return METRICS[metric](pred, ground_truths)


# ---------------------------------------------------------------------------------------------
# Reward
# ---------------------------------------------------------------------------------------------

#: Characters at the end of a response that the reference reward searches for the answer box.
REFERENCE_WINDOW = 300

# The reference reward's light normalisation, applied in this order by plain substring
# replacement (so earlier rules feed later ones): line breaks, LaTeX thin negative space, doubled
# backslashes, \tfrac / \dfrac, \left / \right, degree marks, escaped dollar and percent signs,
# a leading zero before a bare decimal point; then (on a non-empty string) every space.  Tabs and
# other whitespace are kept, and so are punctuation and articles.
_REFERENCE_REWRITES = (
    ("\n", ""),
    ("\\!", ""),
    ("\\\\", "\\"),
    ("tfrac", "frac"),
    ("dfrac", "frac"),
    ("\\left", ""),
    ("\\right", ""),
    ("^{\\circ}", ""),
    ("^\\circ", ""),
    ("\\$", ""),
    ("\\%", ""),
    (" .", " 0."),
    ("{.", "{0."),
)


def _reference_normalize(text: str) -> str:
    for old, new in _REFERENCE_REWRITES:
        text = text.replace(old, new)
    return text.replace(" ", "")


def _reference_boxed_answer(window: str) -> str | None:
    """The answer the reference reward reads from ``window`` (already cut and lower-cased).

    * If ``"\\boxed "`` (with a space) occurs anywhere, the answer is everything after its last
      occurrence up to the first ``$`` (or the end), braces and all.
    * Otherwise the last ``\\boxed`` (else the last ``\\fbox``) is found, and from there the
      characters are scanned counting ``{`` up and ``}`` down; the command ends at the first ``}``
      that brings the count back to exactly 0.  No such ``}``: no answer.  The command must read
      ``\\boxed{...}``: anything else (``\\fbox{...}``, ``\\boxedx{...}``) gives no answer.
      Only the *last* command is tried: an unclosed last box hides an earlier complete one.
    """
    spaced = "\\boxed "
    if spaced in window:
        return window.rsplit(spaced, 1)[1].split("$", 1)[0]
    start = window.rfind("\\boxed")
    if start < 0:
        start = window.rfind("\\fbox")
        if start < 0:
            return None
    depth = 0
    end = -1
    for pos in range(start, len(window)):
        ch = window[pos]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                end = pos
                break
    if end < 0:
        return None
    command = window[start : end + 1]
    opener = "\\boxed{"
    if not command.startswith(opener):
        return None
    return command[len(opener) : -1]


def reference_boxed_reward(response: str, ground_truths: str | Iterable[str], *, drop_think: bool = False) -> float:
    """MemAgent's training reward for HotpotQA, reproduced rule for rule.

    1. Keep the last :data:`REFERENCE_WINDOW` (300) characters of the response and lower-case them
       (a box that starts earlier is not seen).
    2. Read the answer of the last box (:func:`_reference_boxed_answer`); none gives 0.0.
    3. Compare it with each ground truth, lower-cased; both sides pass through the light
       normalisation of :data:`_REFERENCE_REWRITES` and lose their spaces.  Punctuation and the
       articles a/an/the are kept, so ``\\boxed{The Hop-Frog}`` vs ``Hop-Frog`` gives 0.0 and
       ``\\boxed{Hop Frog}`` vs ``hopfrog`` gives 1.0.  An empty box equals an empty (or
       all-space) ground truth.
    4. 1.0 if any ground truth is equal, else 0.0.

    ``drop_think`` first cuts the response to its answer part (:func:`strip_think`); the
    reference does not.  A single string counts as one ground truth (the reference would iterate
    over its characters); no ground truths give 0.0.  Never raises for any ``response``.
    """
    if not isinstance(response, str):
        return 0.0
    if drop_think:
        response = strip_think(response)
    window = response[-REFERENCE_WINDOW:].lower()
    answer = _reference_boxed_answer(window)
    if answer is None:
        return 0.0
    answer = _reference_normalize(answer)
    return float(any(answer == _reference_normalize(g.lower()) for g in _as_list(ground_truths)))


#: Reward styles: name -> (extraction mode, metric).  All rewards are 0.0 or 1.0.
#:
#: * ``reference_boxed``: the MemAgent training reward exactly (:func:`reference_boxed_reward`:
#:   last box in the last 300 characters, lower-case and space removal only).  The reference
#:   recipe configs use it.
#: * ``boxed_em`` (the function default): last boxed answer anywhere in the response (this
#:   module's :func:`extract_boxed`), SQuAD-normalised exact match (punctuation and articles
#:   dropped).  More lenient than the reference on formatting.
#: * ``boxed_sub_em``: last boxed answer, normalised substring match either way.
#: * ``answer_phrase_em``: text after the last "the answer is", exact match.
#: * ``any_em``: the boxed answer if there is one, else the answer phrase; exact match.
#: * ``boxed_all``: the boxed answer contains every ground truth (case-insensitive); for tasks
#:   whose answer is a set (multi-value needles, variable tracking).
REWARD_STYLES = {
    "reference_boxed": ("reference", "reference"),
    "boxed_em": ("boxed", "em"),
    "boxed_sub_em": ("boxed", "sub_em"),
    "answer_phrase_em": ("answer_phrase", "em"),
    "any_em": ("boxed_or_phrase", "em"),
    "boxed_all": ("boxed", "all"),
}


def reward(
    response: str, ground_truths: str | Iterable[str], style: str = "boxed_em", *, drop_think: bool = False
) -> float:
    """Training reward of one final response: 1.0 if correct under ``style``, else 0.0.

    No answer found gives 0.0.  ``style`` is a key of :data:`REWARD_STYLES`; an unknown style raises
    ``ValueError`` (configuration error).  ``drop_think`` scores only the text after the last
    ``</think>`` (:func:`strip_think`); off by default, as in the reference.  Never raises for any
    ``response``.
    """
    if style not in REWARD_STYLES:
        raise ValueError(f"unknown reward style {style!r}; choose one of {tuple(REWARD_STYLES)}")
    mode, metric = REWARD_STYLES[style]
    if mode == "reference":
        return reference_boxed_reward(response, ground_truths, drop_think=drop_think)
    pred = extract_prediction(response, mode, drop_think=drop_think)
    if pred is None:
        return 0.0
    if metric == "all":
        return 1.0 if string_match_all(pred, ground_truths) == 1.0 else 0.0
    return METRICS[metric](pred, ground_truths)


def resolve_reward_style(style: str | None, default: str = "boxed_em") -> str:
    """The reward style to use for a record whose data names ``style``.

    Training files carry ``reward_model.style``; the reference files say ``"rule"``, which means
    the default rule (``default``).  A style that names one of :data:`REWARD_STYLES` (as synthetic
    data does, e.g. ``"boxed_all"`` for multi-answer tasks) is used as given.
    """
    if style in REWARD_STYLES:
        return style
    if default not in REWARD_STYLES:
        raise ValueError(f"unknown reward style {default!r}; choose one of {tuple(REWARD_STYLES)}")
    return default
