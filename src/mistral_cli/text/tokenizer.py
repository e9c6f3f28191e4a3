"""The SentencePiece tokenizer of Mistral 7B, and a streaming decoder that prints exactly what a whole decode would.

`encode` adds neither BOS nor EOS and never yields a control token from text (`"</s>"` typed by a user is text).
`decode` is SentencePiece's own: control tokens (BOS, EOS) vanish, `<unk>` becomes `" ⁇ "`, the leading `▁` of the
first piece is dropped, and runs of byte tokens (`<0x..>`) become UTF-8 text with one U+FFFD per invalid byte.

`StreamDecoder` reproduces that decode one token at a time in O(1) per token: it holds back at most three bytes of an
unfinished UTF-8 character and mirrors SentencePiece's rule for dropping the first `▁` (docs/FORMAT.md section 4).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import sentencepiece

from mistral_cli.errors import MistralError

_SPACE = "\u2581"  # "▁", SentencePiece's visible space
_REPLACEMENT = "\ufffd"

# Kinds of piece, as the decoder treats them: text with ▁ for spaces, one byte, or a fixed surface (control, <unk>).
_TEXT, _BYTE, _FIXED = range(3)


def _utf8_leads() -> list[tuple[int, int, int] | None]:
    """For each first byte: (length, lowest, highest allowed second byte) of a well-formed UTF-8 character.

    These are the Unicode well-formed ranges, which is exactly what SentencePiece's decoder accepts (no overlongs,
    no surrogates, nothing above U+10FFFF); None marks bytes that can never start a character.
    """
    leads: list[tuple[int, int, int] | None] = [None] * 256
    for b in range(0x80):
        leads[b] = (1, 0, 0)
    for b in range(0xC2, 0xE0):
        leads[b] = (2, 0x80, 0xBF)
    for b in range(0xE0, 0xF0):
        leads[b] = (3, 0xA0 if b == 0xE0 else 0x80, 0x9F if b == 0xED else 0xBF)
    for b in range(0xF0, 0xF5):
        leads[b] = (4, 0x90 if b == 0xF0 else 0x80, 0x8F if b == 0xF4 else 0xBF)
    return leads


_LEADS = _utf8_leads()


def _char_at(buf: bytearray, i: int) -> int:
    """Length of the complete character starting at buf[i]; 0 if more bytes could still complete it; -1 if invalid."""
    lead = _LEADS[buf[i]]
    if lead is None:
        return -1
    n, lo, hi = lead
    for k in range(1, n):
        if i + k >= len(buf):
            return 0
        b = buf[i + k]
        if not (lo <= b <= hi if k == 1 else 0x80 <= b <= 0xBF):
            return -1
    return n


class Tokenizer:
    """A SentencePiece model file (`tokenizer.model`), loaded once."""

    def __init__(self, path: Path) -> None:
        path = Path(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise MistralError(f"Tokenizer file {path} does not exist.") from None
        except OSError as e:
            raise MistralError(f"Cannot read tokenizer file {path}: {e.strerror or e}.") from None
        sp = sentencepiece.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(data)
        except RuntimeError:
            raise MistralError(f"Tokenizer file {path} is not a SentencePiece model.") from None
        if sp.bos_id() < 0 or sp.eos_id() < 0:
            raise MistralError(f"Tokenizer file {path} has no BOS or EOS token, so it cannot be Mistral's.")
        self.path = path
        self._sp = sp
        self.bos_id: int = sp.bos_id()
        self.eos_id: int = sp.eos_id()
        self.vocab_size: int = sp.get_piece_size()
        self._pieces: dict[int, tuple[int, str, int]] = {}

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    @functools.cached_property
    def max_piece_bytes(self) -> int:
        """The most UTF-8 bytes of text one token stands for (25 in Mistral's vocabulary). A text of B bytes is
        then at least B / max_piece_bytes tokens, which bounds the work on a prompt before it is encoded."""
        sp, most = self._sp, 1
        for i in range(self.vocab_size):
            if not (sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i)):
                most = max(most, len(sp.id_to_piece(i).replace(_SPACE, " ").encode("utf-8")))
        return most

    def count_at_least(self, text: str, limit: int) -> int | None:
        """None when `text` has fewer than `limit` tokens; else its token count (a lower bound when only its start was
        encoded). Only the first `limit * max_piece_bytes` characters are encoded when they already hold `limit`
        tokens, so a huge text costs no more than one that fits."""
        head = text[: limit * self.max_piece_bytes]
        n = len(self.encode(head))
        if n >= limit:
            return n if len(head) == len(text) else max(n, len(text) // self.max_piece_bytes)
        if len(head) == len(text):
            return None
        n = len(self.encode(text))  # a tokenizer that packs more text into a token than its pieces show
        return n if n >= limit else None

    def stream(self, leading_space: bool = False) -> StreamDecoder:
        return StreamDecoder(self, leading_space)

    def piece(self, token_id: int) -> str:
        """The raw piece of an id (`"▁Paris"`, `"<0x0A>"`, `"</s>"`), for diagnostics."""
        return self._sp.id_to_piece(token_id)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for in running text: a text piece with its ▁ as a space, a byte-fallback piece
        its one byte, BOS/EOS nothing. (For log-probabilities and grammar engines, which work on bytes.)"""
        kind, text, byte = self._piece_info(token_id)
        if kind == _BYTE:
            return bytes([byte])
        return text.replace(_SPACE, " ").encode("utf-8")

    def _piece_info(self, token_id: int) -> tuple[int, str, int]:
        """(kind, surface, byte) of an id, cached: a text piece keeps its ▁, a byte piece has its value."""
        info = self._pieces.get(token_id)
        if info is None:
            if not 0 <= token_id < self.vocab_size:
                raise IndexError(f"token id {token_id} is outside the vocabulary (0..{self.vocab_size - 1})")
            sp, piece = self._sp, self._sp.id_to_piece(token_id)
            if sp.is_byte(token_id):
                info = (_BYTE, "", int(piece[3:5], 16))
            elif sp.is_control(token_id) or sp.is_unknown(token_id):
                info = (_FIXED, sp.decode([token_id]), -1)  # "" for BOS/EOS, " ⁇ " for <unk>
            else:
                info = (_TEXT, piece, -1)
            self._pieces[token_id] = info
        return info


class StreamDecoder:
    """Turns token ids into text as they come; the pieces joined (plus `flush()`) equal `Tokenizer.decode`.

    With `leading_space=True` the ids are taken to follow a prompt, so a leading `▁` is a real space, as when the
    whole prompt plus continuation is decoded at once.
    """

    def __init__(self, tok: Tokenizer, leading_space: bool = False) -> None:
        self._info = tok._piece_info
        self._pending = bytearray()  # bytes of a UTF-8 character not yet complete (at most 3)
        # SentencePiece drops the leading ▁ of the first piece, until some text or a dropped ▁ has come out.
        self._at_start = not leading_space

    def push(self, token_id: int) -> str:
        kind, text, byte = self._info(int(token_id))
        if kind == _BYTE:
            self._pending.append(byte)
            out = self._drain(final=False)
        else:
            # A non-byte piece ends the byte run: incomplete bytes are final there, as in a whole decode.
            out = self._drain(final=True)
            if kind == _TEXT:
                if self._at_start and not out and text.startswith(_SPACE):
                    text = text[1:]
                    self._at_start = False
                text = text.replace(_SPACE, " ")
            out += text
        if out:
            self._at_start = False
        return out

    def flush(self) -> str:
        out = self._drain(final=True)
        if out:
            self._at_start = False
        return out

    def _drain(self, final: bool) -> str:
        """Text of the pending bytes that is decided; `final` means no more bytes of this run will come."""
        buf = self._pending
        if not buf:
            return ""
        out: list[str] = []
        i = 0
        while i < len(buf):
            n = _char_at(buf, i)
            if n > 0:
                out.append(buf[i : i + n].decode("utf-8"))
                i += n
            elif n < 0 or final:
                out.append(_REPLACEMENT)  # one U+FFFD per invalid byte, as SentencePiece does
                i += 1
            else:
                break
        del buf[:i]
        return "".join(out)
