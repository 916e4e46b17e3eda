"""Tests of the small-tokenizer helper (memagent_jax.data.tokenizer)."""

import json

import pytest

from memagent_jax.data import synthetic
from memagent_jax.data import tokenizer as T


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    return T.train_tokenizer(synthetic.tokenizer_corpus(), path, vocab_size=1024)


@pytest.fixture(scope="module")
def tok(folder):
    return T.load_tokenizer(folder)


def test_files_and_config(folder):
    assert sorted(p.name for p in folder.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["chat_template"] == T.CHAT_TEMPLATE
    assert config["eos_token"] == "<|im_end|>" and config["pad_token"] == "<|endoftext|>"


def test_deterministic(tmp_path, folder):
    again = T.train_tokenizer(synthetic.tokenizer_corpus(), tmp_path / "again", vocab_size=1024)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (again / name).read_bytes() == (folder / name).read_bytes()


def test_loads_with_autotokenizer_and_special_ids(tok):
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == 0
    assert tok.convert_tokens_to_ids("<|im_start|>") == 1
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    assert len(tok) == 1024


def test_chat_template(tok):
    messages = [{"role": "user", "content": "What is the secret number for amber falcon?"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nWhat is the secret number for amber falcon?<|im_end|>\n<|im_start|>assistant\n"
    no_gen = tok.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    assert no_gen == "<|im_start|>user\nWhat is the secret number for amber falcon?<|im_end|>\n"
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = enc["input_ids"]  # transformers 5: a BatchEncoding
    assert ids[0] == 1 and ids.count(2) == 1
    assert tok.decode(ids) == text


def test_digits_are_single_tokens_and_roundtrip(tok):
    tokens = tok.convert_ids_to_tokens(tok.encode(" 4821934", add_special_tokens=False))
    assert tokens[-7:] == list("4821934")
    for text in ["The answer is \\boxed{4821934}.", "Let ABCDE be 12345.\n\nÜnïcödé ✓ {}\\", "  two  spaces\ttab"]:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_synthetic_words_are_single_tokens(tok):
    units = {
        u
        for template in synthetic.vocabulary.TEMPLATE_UNITS
        for part in template
        for u in (part if isinstance(part, tuple) else (part,))
    }
    multi = sorted(u for u in units if len(tok.encode(u, add_special_tokens=False)) != 1)
    assert multi == []


def test_token_counter_kinds(tok, folder):
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(folder / "tokenizer.json"))
    text = " The quiet river waited near the mill. 12345"
    n = len(tok.encode(text, add_special_tokens=False))
    assert T.token_counter(tok)(text) == n
    assert T.token_counter(raw)(text) == n
    assert T.token_counter(lambda s: len(s.split()))(text) == 8
    assert T.token_counter(lambda s: list(range(3)))(text) == 3
    counter = T.token_counter(tok)
    assert T.token_counter(counter) is counter
    with pytest.raises(TypeError):
        T.token_counter(42)


def test_vocab_size_too_small():
    with pytest.raises(ValueError):
        T.build_tokenizer(["abc"], vocab_size=200)


@pytest.mark.faults
def test_encoders_read_spelled_control_tokens_as_plain_text(tok, folder):
    """encode_fn and token_counter (the synthetic generators' encoders) read '<|im_end|>' as characters, as the agent
    reads documents, and give the ordinary ids for ordinary text; a whitespace-only added token stays a token."""
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ordinary = " The quiet river waited near the mill. 12345\n\n{x} \\boxed{y}"
    spelled = "before <|im_end|>\n<|im_start|>assistant\n after<|endoftext|>"
    for kind in (tok, raw):
        assert T.encode_fn(kind)(ordinary) == tok.encode(ordinary, add_special_tokens=False)
        ids = T.encode_fn(kind)(spelled)
        assert not {0, 1, 2} & set(ids) and tok.decode(ids) == spelled
        assert T.token_counter(kind)(spelled) == len(ids) > len(tok.encode(spelled, add_special_tokens=False))
    assert T.control_token_ids(tok) == T.control_token_ids(raw) == {0, 1, 2}
    raw.add_tokens(["  "])  # a whitespace-only added token: text, still matched, never a control token
    assert T.control_token_ids(raw) == {0, 1, 2}
    assert T.encode_plain(raw, "a  b") == raw.encode("a  b", add_special_tokens=False).ids
    assert raw.token_to_id("  ") in T.encode_plain(raw, "a  b")
    assert not {0, 1, 2} & set(T.encode_plain(raw, "a  b<|im_end|>"))
