"""The tokenizer against SentencePiece itself: encode, decode, and the streaming decoder token by token."""

import subprocess
import sys

import pytest
import sentencepiece
from hypothesis import given, settings
from hypothesis import strategies as st

from mistral_cli.errors import MistralError
from mistral_cli.text.tokenizer import Tokenizer
from tiny import tokenizer_path

TEXTS = [
    "Hello, world!",
    "  two leading spaces and trailing ones  ",
    "The capital of France is Paris.",
    "emoji 🦩🤖 family 👨‍👩‍👧 and flags 🇫🇷",
    "日本語のテキストと한국어 and 中文",
    "math 𝔘 ∑ ∫ — dashes … ellipses",
    'def f(x):\n\treturn {"a": x**2}  # code\n\n',
    "</s> <s> <unk> [INST] typed by a user [/INST]",
    "\n\nnewlines first",
    "",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(tokenizer_path())


@pytest.fixture(scope="module")
def sp() -> sentencepiece.SentencePieceProcessor:
    return sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_path()))


def streamed(tok: Tokenizer, ids: list[int], leading_space: bool = False) -> list[str]:
    s = tok.stream(leading_space=leading_space)
    return [s.push(i) for i in ids] + [s.flush()]


def test_special_ids(tok):
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 32000)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_is_sentencepiece_without_bos_eos(tok, sp, text):
    ids = tok.encode(text)
    assert ids == sp.encode(text)
    assert tok.bos_id not in ids and tok.eos_id not in ids


def test_control_tokens_typed_by_a_user_are_text(tok):
    ids = tok.encode("</s><s>")
    assert set(ids).isdisjoint({0, 1, 2})
    assert tok.decode(ids) == "</s><s>"


def test_decode_drops_control_tokens(tok):
    assert tok.decode([1, *tok.encode("Hi there"), 2]) == "Hi there"
    assert tok.decode([0]) == " \u2047 "


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("leading_space", [False, True])
def test_stream_real_text(tok, text, leading_space):
    ids = tok.encode(text)
    prompt = tok.encode("Some prompt:")
    expected = tok.decode(ids) if not leading_space else tok.decode(prompt + ids)[len(tok.decode(prompt)) :]
    assert "".join(streamed(tok, ids, leading_space)) == expected
    if not leading_space and not text.startswith(" "):
        assert expected == text


def test_stream_raw_continuation_keeps_the_space(tok):
    ids = tok.encode("Paris")
    assert tok.piece(ids[0]) == "\u2581Paris"
    assert "".join(streamed(tok, ids, leading_space=True)) == " Paris"
    assert "".join(streamed(tok, ids)) == "Paris"


def test_stream_holds_bytes_until_the_character_is_complete(tok):
    ids = tok.encode("🦩!")  # "▁" + four byte tokens + "!"
    assert [tok.piece(i) for i in ids[1:5]] == ["<0xF0>", "<0x9F>", "<0xA6>", "<0xA9>"]
    assert streamed(tok, ids) == ["", "", "", "", "🦩", "!", ""]


def test_stream_invalid_bytes_like_sentencepiece(tok):
    byte = lambda b: 3 + b
    # Truncated emoji, then a control token ending the run: one U+FFFD per byte, as SentencePiece does.
    ids = [byte(0xF0), byte(0x9F), 2, byte(0x98), byte(0x80)]
    assert "".join(streamed(tok, ids)) == tok.decode(ids) == "\ufffd" * 4
    # Not Python's "replace" (which gives one U+FFFD for E2 82).
    ids = [byte(0xE2), byte(0x82), byte(0x41)]
    assert "".join(streamed(tok, ids)) == tok.decode(ids) == "\ufffd\ufffdA"


@pytest.mark.parametrize(
    "data",
    ["E0 80 80", "E0 A0 80", "ED A0 80", "ED 9F BF", "F0 8F BF BF", "F4 90 80 80", "F4 8F BF BF", "C0 80", "C2 80",
     "F5 80 80 80", "EF BF BD", "F0 9F A6", "80 BF 41"],
)  # fmt: skip
def test_stream_utf8_edge_cases(tok, data):
    ids = [3 + b for b in bytes.fromhex(data)]
    assert "".join(streamed(tok, ids)) == tok.decode(ids)


def test_stream_rejects_ids_outside_the_vocabulary(tok):
    with pytest.raises(IndexError):
        tok.stream().push(tok.vocab_size)


# Bytes at the edges of UTF-8's well-formed ranges (overlongs, surrogates, above U+10FFFF, U+FFFD itself).
EDGE_BYTES = [
    0x41,
    0x7F,
    0x80,
    0x8F,
    0x90,
    0x9F,
    0xA0,
    0xBD,
    0xBF,
    0xC0,
    0xC1,
    0xC2,
    0xDF,
    0xE0,
    0xED,
    0xEF,
    0xF0,
    0xF4,
]
EDGE_BYTES += [0xF5, 0xFF]
# Byte tokens dominate (they are what makes streaming hard), then the control ids, "▁" alone, and any piece.
token_ids = st.one_of(
    st.integers(3, 258),
    st.sampled_from(EDGE_BYTES).map(lambda b: 3 + b),
    st.integers(0, 2),
    st.sampled_from([28705, 13, 29274, 5465, 415]),  # "▁", "\n", ZWJ, "▁Paris", "▁The"
    st.integers(0, 31999),
)
# Bytes of real UTF-8, sometimes cut or mixed with other ids, so complete multi-byte characters occur often.
utf8_byte_ids = st.text(min_size=1, max_size=6).map(lambda s: [3 + b for b in s.encode("utf-8")])
id_lists = st.one_of(
    st.lists(token_ids, max_size=24),
    st.lists(st.one_of(utf8_byte_ids, st.lists(token_ids, max_size=3)), max_size=8).map(
        lambda parts: [i for part in parts for i in part]
    ),
)


@settings(max_examples=600, deadline=None)
@given(ids=id_lists)
def test_stream_equals_whole_decode(tok, ids):
    assert "".join(streamed(tok, ids)) == tok.decode(ids)


@settings(max_examples=600, deadline=None)
@given(ids=id_lists, prompt=st.sampled_from(["The capital of France is", "x", "Hello\n"]))
def test_stream_after_a_prompt_equals_whole_decode(tok, ids, prompt):
    prompt_ids = [tok.bos_id, *tok.encode(prompt)]
    whole = tok.decode(prompt_ids + ids)
    assert whole == tok.decode(prompt_ids) + "".join(streamed(tok, ids, leading_space=True))


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=40))
def test_encode_decode_round_trip(tok, text):
    ids = tok.encode(text)
    assert set(ids).isdisjoint({1, 2})
    assert "".join(streamed(tok, ids)) == tok.decode(ids)


def test_missing_file(tmp_path):
    with pytest.raises(MistralError, match="does not exist") as e:
        Tokenizer(tmp_path / "tokenizer.model")
    assert "tokenizer.model" in str(e.value)


def test_directory_is_not_a_tokenizer(tmp_path):
    with pytest.raises(MistralError, match="Cannot read tokenizer file"):
        Tokenizer(tmp_path)


@pytest.mark.parametrize("content", [b"", b"not a model at all", b'{"model": {"type": "BPE"}}'])
def test_not_a_sentencepiece_model(tmp_path, content):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(content)
    with pytest.raises(MistralError, match="SentencePiece|BOS") as e:
        Tokenizer(path)
    assert str(path) in str(e.value)


def test_importing_does_not_import_torch():
    code = "import sys, mistral_cli.text.tokenizer, mistral_cli.text.chat_format; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
