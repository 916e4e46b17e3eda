"""Small tokenizers for synthetic tasks and tests: train, save as a Hugging Face folder, count tokens.

:func:`train_tokenizer` trains a byte-level BPE tokenizer with the ``tokenizers`` library on any
iterable of texts and writes a folder that ``transformers.AutoTokenizer.from_pretrained(folder)``
loads offline, chat template included.  Design choices:

* **Byte level**: every string (any Unicode, newlines, backslashes, braces) encodes and decodes
  back exactly, so a model trained with it can write ``\\boxed{...}`` and the verifier sees the same
  text.  Nothing maps to an unknown token.
* **Digits one by one**: each digit is its own token, so numbers of any length use a ten-token
  alphabet instead of one vocabulary entry per number (and a model can copy them digit by digit).
* **Words**: a space attaches to the following word (``" river"`` is one pre-token); with enough
  vocabulary every frequent word of the training texts is one token, identifiers split into
  sub-words.
* **Special tokens**: ``<|endoftext|>`` (padding), ``<|im_start|>``, ``<|im_end|>`` (end of a
  turn, the end-of-sequence token), given ids 0, 1, 2.
* **Chat template**: ChatML-style turns, written out in :data:`CHAT_TEMPLATE`.
* **Deterministic**: the same texts and settings give byte-identical files (BPE merges are chosen
  by count with a fixed tie-break); no network is used.

:func:`encode_plain` encodes text as plain text: no added token (``<|im_start|>``, ``<|im_end|>``,
``<|endoftext|>``, ``<think>``, ...) is ever parsed out of it, so a document or question that spells one reads as
the characters it is, never as a control token. Only the chat template's own pieces may hold control tokens
(:func:`memagent_jax.agent.templates.encode_template`). Text without such spellings encodes exactly as the
tokenizer's ordinary call does.

:func:`token_counter` turns any tokenizer (a ``transformers`` tokenizer, a ``tokenizers.Tokenizer``
or a plain callable) into a ``str -> int`` function with a memo, used by the synthetic generators
to hit target lengths.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "PAD_TOKEN",
    "BOS_TOKEN",
    "EOS_TOKEN",
    "SPECIAL_TOKENS",
    "CHAT_TEMPLATE",
    "build_tokenizer",
    "save_tokenizer_folder",
    "train_tokenizer",
    "load_tokenizer",
    "token_counter",
    "TokenCounter",
    "encode_fn",
    "encode_plain",
    "encode_plain_batch",
    "control_token_ids",
    "ControlTokenError",
]

PAD_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|im_start|>"  # start of a chat turn
EOS_TOKEN = "<|im_end|>"  # end of a chat turn; generation stops here
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)

#: ChatML-style template: each message is ``<|im_start|>ROLE\nCONTENT<|im_end|>\n``; a generation
#: prompt opens an assistant turn.  No default system message is inserted.
CHAT_TEMPLATE = (
    "{%- for msg in messages -%}"
    "{{ '<|im_start|>' + msg['role'] + '\\n' + msg['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def build_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 1024,
    *,
    min_frequency: int = 1,
    special_tokens: Sequence[str] = SPECIAL_TOKENS,
):
    """Train a byte-level BPE ``tokenizers.Tokenizer`` on ``texts`` (an iterable of strings).

    ``vocab_size`` counts the special tokens and the 256 byte symbols, so it must exceed
    ``256 + len(special_tokens)``; training stops early when no pair is left to merge.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size <= 256 + len(special_tokens):
        raise ValueError(f"vocab_size={vocab_size} leaves no room for merges (need > {256 + len(special_tokens)})")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(iter(texts), trainer=trainer)
    return tok


def save_tokenizer_folder(
    tok,
    folder: str | os.PathLike,
    *,
    pad_token: str = PAD_TOKEN,
    eos_token: str = EOS_TOKEN,
    bos_token: str | None = None,
    chat_template: str = CHAT_TEMPLATE,
    model_max_length: int = 1 << 30,
) -> Path:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` (with ``chat_template``) to ``folder``.

    ``tok`` is a ``tokenizers.Tokenizer`` whose vocabulary contains the named special tokens.
    Returns the folder path.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = tok.get_vocab(with_added_tokens=True)
    for name, value in (("pad_token", pad_token), ("eos_token", eos_token), ("bos_token", bos_token)):
        if value is not None and value not in vocab:
            raise ValueError(f"{name} {value!r} is not in the tokenizer's vocabulary")
    tok.save(str(folder / "tokenizer.json"))
    added = {}
    for token_id, added_token in sorted(tok.get_added_tokens_decoder().items()):
        added[str(token_id)] = {
            "content": added_token.content,
            "lstrip": added_token.lstrip,
            "normalized": added_token.normalized,
            "rstrip": added_token.rstrip,
            "single_word": added_token.single_word,
            "special": added_token.special,
        }
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": bos_token,
        "eos_token": eos_token,
        "pad_token": pad_token,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": chat_template,
    }
    with open(folder / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
        f.write("\n")
    return folder


def train_tokenizer(
    texts: Iterable[str],
    folder: str | os.PathLike,
    vocab_size: int = 1024,
    *,
    min_frequency: int = 1,
    chat_template: str = CHAT_TEMPLATE,
) -> Path:
    """Train a byte-level BPE tokenizer on ``texts`` and save it as a Hugging Face folder.

    The result loads with ``transformers.AutoTokenizer.from_pretrained(folder)`` (offline): pad
    token ``<|endoftext|>`` (id 0), eos ``<|im_end|>`` (id 2), chat template
    :data:`CHAT_TEMPLATE`.  Returns the folder path.  Deterministic for the same inputs.
    """
    tok = build_tokenizer(texts, vocab_size, min_frequency=min_frequency)
    return save_tokenizer_folder(tok, folder, chat_template=chat_template)


def load_tokenizer(folder: str | os.PathLike):
    """Load a tokenizer folder with ``transformers.AutoTokenizer`` (local files only)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


class ControlTokenError(ValueError):
    """The tokenizer turns plain text into a control token even with added-token parsing off (its base vocabulary
    holds the control token's spelling as an ordinary word)."""


_PLAIN_CACHE: dict[int, tuple[Any, int, Any, frozenset]] = {}  # id(tokenizer) -> (tokenizer, size, plain, controls)
_PLAIN_CACHE_SIZE = 8
_PLAIN_LOCK = threading.Lock()


def _backend(tokenizer):
    """The `tokenizers.Tokenizer` behind `tokenizer` (itself, or a transformers tokenizer's backend), or None."""
    try:
        from tokenizers import Tokenizer as _RawTokenizer
    except ImportError:  # pragma: no cover - tokenizers is a core dependency
        return None
    if isinstance(tokenizer, _RawTokenizer):
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend if isinstance(backend, _RawTokenizer) else None


def _plain(tokenizer):
    """(plain backend or None, control token ids) for `tokenizer`, built once per tokenizer and added-vocab size.

    The plain backend runs the tokenizer's own `tokenizers` pipeline (its normalizer, pre-tokenizer and model,
    shared, not copied) without the added tokens that are not whitespace only: those spellings go through the
    model like any other text. Whitespace-only added tokens (runs of spaces or newlines some vocabularies add) are
    text, not control: they stay (in a copy of the pipeline whose other added tokens are special and unparsed).
    """
    backend = _backend(tokenizer)
    if backend is None:
        size = len(tokenizer) if hasattr(tokenizer, "__len__") else 0
    else:
        size = backend.get_vocab_size(with_added_tokens=True)
    with _PLAIN_LOCK:
        entry = _PLAIN_CACHE.get(id(tokenizer))
    if entry is not None and entry[0] is tokenizer and entry[1] == size:
        return entry[2], entry[3]
    if backend is None:
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        controls = frozenset(int(i) for i, t in added.items() if not str(t).isspace())
        plain = None
    else:
        from tokenizers import Tokenizer as _RawTokenizer

        added = backend.get_added_tokens_decoder()
        controls = frozenset(int(i) for i, t in added.items() if not t.content.isspace())
        if len(controls) == len(added):
            plain = _RawTokenizer(backend.model)
            if backend.normalizer is not None:
                plain.normalizer = backend.normalizer
            if backend.pre_tokenizer is not None:
                plain.pre_tokenizer = backend.pre_tokenizer
        else:
            data = json.loads(backend.to_str())
            for token in data.get("added_tokens") or []:
                token["special"] = token["special"] or int(token["id"]) in controls
            data["truncation"] = data["padding"] = None
            plain = _RawTokenizer.from_str(json.dumps(data))
            plain.encode_special_tokens = True
    with _PLAIN_LOCK:
        if len(_PLAIN_CACHE) >= _PLAIN_CACHE_SIZE:
            _PLAIN_CACHE.pop(next(iter(_PLAIN_CACHE)))
        _PLAIN_CACHE[id(tokenizer)] = (tokenizer, size, plain, controls)
    return plain, controls


def control_token_ids(tokenizer) -> frozenset[int]:
    """The ids of the tokenizer's control tokens: its added tokens (special or not, e.g. Qwen's ``<think>``), less
    whitespace-only ones. :func:`encode_plain` never returns them."""
    return _plain(tokenizer)[1]


def encode_plain_batch(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text read as plain text: no special tokens added, no added token parsed from the text.

    `tokenizer`: a transformers tokenizer or a ``tokenizers.Tokenizer``. Text that spells no added token gets
    exactly the ids of ``tokenizer(text, add_special_tokens=False)``. A tokenizer whose base vocabulary still turns
    such a spelling into a control token is a `ControlTokenError` (no such text is let through as control)."""
    texts = list(texts)
    if not texts:
        return []
    plain, controls = _plain(tokenizer)
    if plain is not None:
        out = [list(e.ids) for e in plain.encode_batch(texts, add_special_tokens=False)]
    else:  # a Python-backend transformers tokenizer: split_special_tokens skips every added token there
        out = [list(ids) for ids in tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]]
    if controls:
        for ids in out:
            bad = controls.intersection(ids)
            if bad:
                token = min(bad)
                spelling = plain.id_to_token(token) if plain is not None else tokenizer.convert_ids_to_tokens(token)
                raise ControlTokenError(
                    f"the text spells the control token {spelling!r} (id {token}) and this tokenizer reads that "
                    f"spelling as the control token even as plain text; remove it from the text"
                )
    return out


def encode_plain(tokenizer, text: str) -> list[int]:
    """Token ids of one text read as plain text (see `encode_plain_batch`); empty text -> []."""
    return encode_plain_batch(tokenizer, [text])[0] if text else []


def encode_fn(tokenizer) -> Callable[[str], list[int]]:
    """Return ``str -> list[int]`` (no special tokens added) for the supported tokenizer kinds.

    Accepts a ``transformers`` tokenizer (anything with ``encode(text, add_special_tokens=...)``),
    a ``tokenizers.Tokenizer`` or a callable returning a sequence of ids. The two tokenizer kinds read the text
    as plain text (`encode_plain`), as the agent reads documents.
    """
    if _backend(tokenizer) is not None or (
        hasattr(tokenizer, "encode") and hasattr(tokenizer, "convert_tokens_to_ids")
    ):
        return lambda text: encode_plain(tokenizer, text)
    if callable(tokenizer):
        return lambda text: list(tokenizer(text))
    raise TypeError(
        f"cannot encode with {type(tokenizer).__name__}: pass a transformers tokenizer, a tokenizers.Tokenizer or a "
        "callable"
    )


class TokenCounter:
    """Counts tokens of text pieces with a tokenizer, memoising pieces up to ``max_memo_len`` chars.

    Build one with :func:`token_counter`.  Counting a long text piece by piece gives the count of
    the whole text when pieces meet at pre-token boundaries (e.g. each piece starts with a space
    followed by a word), which is how the synthetic generators use it.
    """

    def __init__(self, count: Callable[[str], int], max_memo_len: int = 64, max_memo: int = 200_000):
        self._count = count
        self._memo: dict[str, int] = {}
        self._max_memo_len = max_memo_len
        self._max_memo = max_memo

    def __call__(self, text: str) -> int:
        if len(text) > self._max_memo_len:
            return self._count(text)
        n = self._memo.get(text)
        if n is None:
            n = self._count(text)
            if len(self._memo) < self._max_memo:
                self._memo[text] = n
        return n


def token_counter(tokenizer) -> TokenCounter:
    """A memoising ``str -> int`` token counter for a tokenizer or a counting callable.

    ``tokenizer`` may be a :class:`TokenCounter` (returned as is), a ``transformers`` tokenizer, a
    ``tokenizers.Tokenizer``, or a callable returning either an ``int`` (a count) or a sequence of
    ids.  Special tokens are not counted.
    """
    if isinstance(tokenizer, TokenCounter):
        return tokenizer
    encode = encode_fn(tokenizer)  # TypeError for unsupported objects
    is_plain_callable = callable(tokenizer) and not (
        hasattr(tokenizer, "encode")
        and (hasattr(tokenizer, "convert_tokens_to_ids") or hasattr(tokenizer, "token_to_id"))
    )
    if is_plain_callable:

        def count(text: str) -> int:
            out = tokenizer(text)
            return int(out) if isinstance(out, int) else len(out)

        return TokenCounter(count)
    return TokenCounter(lambda text: len(encode(text)))
