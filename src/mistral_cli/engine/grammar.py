"""Constrained decoding: an output format (text/output_format.py) compiled by llguidance into a token mask per step.

llguidance is the grammar engine llama.cpp and vLLM use (BENCHMARKS.md, "Constrained decoding", for why it and not
xgrammar): it takes JSON schemas, regular expressions and Lark or GBNF grammars, and computes which of the 32000
tokens may come next from each token's bytes. We give it the vocabulary as bytes (tokenizer.token_bytes: `▁` as a
space, byte-fallback tokens as their byte, BOS/EOS/<unk> marked special with a 0xFF prefix, as its other tokenizer
adapters do) and a function that tokenizes text as it reads after other text (without SentencePiece's leading
space). The engine (engine.py) applies the mask to the logits before sampling and advances the matcher with each
token; end of sequence is allowed by the mask only where the format may end.

JSON is generated compact (no whitespace between tokens of the JSON syntax): any valid JSON, and a model that would
pad its output with spaces and newlines cannot run on forever inside an object.
"""

from __future__ import annotations

import contextlib
import json
from functools import cache
from typing import Any

import torch

from mistral_cli.errors import MistralError
from mistral_cli.text.output_format import OutputFormat
from mistral_cli.text.tokenizer import Tokenizer

_JSON_OPTIONS = {"whitespace_flexible": False}
_BITS = torch.arange(32, dtype=torch.int32)


@cache
def _ll_tokenizer(tokenizer: Tokenizer) -> Any:
    """llguidance's view of our vocabulary, built once per tokenizer (a few hundred ms)."""
    import llguidance

    sp = tokenizer._sp
    tokens = []
    for i in range(tokenizer.vocab_size):
        if sp.is_control(i) or sp.is_unknown(i):
            tokens.append(b"\xff" + sp.id_to_piece(i).encode("utf-8"))
        else:
            tokens.append(tokenizer.token_bytes(i))
    newline = tokenizer.encode("\n")

    class Vocabulary:
        eos_token_id = tokenizer.eos_id
        bos_token_id = tokenizer.bos_id
        special_token_ids = [i for i, t in enumerate(tokens) if t.startswith(b"\xff")]

        def __init__(self) -> None:
            self.tokens = tokens

        def __call__(self, text: str | bytes) -> list[int]:
            # Text that follows other text: SentencePiece would put a space in front of it on its own; after a
            # newline it does not, so encode the two and take the newline's tokens off.
            s = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text
            ids = tokenizer.encode("\n" + s)
            return ids[len(newline) :] if ids[: len(newline)] == newline else tokenizer.encode(s)

    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(Vocabulary()))


class Grammar:
    """An output format compiled for a tokenizer; `matcher()` starts one generation in it."""

    def __init__(self, tokenizer: Tokenizer, fmt: OutputFormat) -> None:
        import llguidance

        self.fmt, self.tokenizer = fmt, tokenizer
        try:
            if fmt.kind in ("json", "json_schema"):
                self.spec = llguidance.LLMatcher.grammar_from_json_schema(fmt.source, overrides=_JSON_OPTIONS)
            elif fmt.kind == "regex":
                self.spec = llguidance.LLMatcher.grammar_from_regex(fmt.source)
            else:
                self.spec = llguidance.grammar_from("grammar", fmt.source)  # Lark, or GBNF converted to Lark
        except (ValueError, TypeError) as e:
            raise MistralError(f"{fmt.origin} cannot be used: {_sentence(e)}") from None
        self._ll = _ll_tokenizer(tokenizer)
        problem = llguidance.LLMatcher.validate_grammar(self.spec, self._ll)
        if problem and not problem.startswith("WARNING"):
            raise MistralError(f"{fmt.origin} cannot be used: {_sentence(problem)}")

    def matcher(self) -> Matcher:
        return Matcher(self)


class Matcher:
    """One generation's place in a Grammar (engine.Constraint)."""

    def __init__(self, grammar: Grammar) -> None:
        import llguidance

        self.grammar = grammar
        self._m = llguidance.LLMatcher(grammar._ll, grammar.spec, log_level=0)
        self._check()
        self._words = torch.empty((grammar._ll.vocab_size + 31) // 32, dtype=torch.int32)

    def mask_(self, logits: torch.Tensor) -> None:
        self._m.unsafe_compute_mask_ptr(self._words.data_ptr(), self._words.numel() * 4)
        self._check()
        allowed = ((self._words.unsqueeze(1) >> _BITS) & 1).view(-1).bool()  # bit i of word j: token 32 j + i
        n = min(allowed.numel(), logits.numel())
        blocked = ~allowed[:n]
        if logits.device.type != "cpu":
            blocked = blocked.to(logits.device, non_blocking=True)
        logits[:n].masked_fill_(blocked, float("-inf"))
        logits[n:] = float("-inf")  # rows past the tokenizer's vocabulary (padding) are never text
        if not bool(allowed[:n].any()):
            raise MistralError(f"No token can continue the text in {self.grammar.fmt.origin}; it cannot be generated.")

    def accept(self, token: int) -> None:
        self._m.consume_token(token)
        self._check()

    def is_stopped(self) -> bool:
        return self._m.is_stopped()

    def is_accepting(self) -> bool:
        return self._m.is_accepting()

    def _check(self) -> None:
        if self._m.is_error():
            raise MistralError(f"{self.grammar.fmt.origin} cannot be followed: {_sentence(self._m.get_error())}")


def _sentence(problem: object) -> str:
    text = str(problem).strip().splitlines()[0] if str(problem).strip() else "the grammar engine refused it"
    if text.startswith("{"):  # some errors come as JSON
        with contextlib.suppress(ValueError, AttributeError):
            text = json.loads(text).get("message", text)
    return text if text.endswith(".") else text + "."
