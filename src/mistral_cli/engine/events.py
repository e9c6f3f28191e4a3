"""What generation yields, a `Chunk` per token and one `Done`, without torch: a server's stream (remote/) yields
the same objects, so the chat and `complete` read both alike and a remote run never imports torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mistral_cli.options import GenerationOptions
    from mistral_cli.text.tokenizer import StreamDecoder


@dataclass
class TokenLogprob:
    """One token's log-probability under the model's raw distribution (before temperature, penalties and grammar
    masks), with the `top` most likely tokens at that position, most likely first."""

    token: int
    text: bytes  # the bytes the token stands for (a byte-fallback token is one byte of a character)
    logprob: float
    top: list[tuple[int, bytes, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The OpenAI shape of one entry of `logprobs.content`, plus our `id`."""
        return {
            "token": self.text.decode("utf-8", errors="replace"),
            "id": self.token,
            "bytes": list(self.text),
            "logprob": self.logprob,
            "top_logprobs": [
                {"token": t.decode("utf-8", errors="replace"), "id": i, "bytes": list(t), "logprob": lp}
                for i, t, lp in self.top
            ],
        }


@dataclass
class Chunk:
    text: str  # may be "" while a multi-byte character or a possible stop string is pending
    token: int  # -1: text with no token id of its own (the held-back tail; a server's stream sends no ids)
    logprob: TokenLogprob | None = None  # when asked for


@dataclass
class Done:
    text: str
    tokens: list[int]  # from a server: one -1 per token it counted
    finish_reason: str  # "stop" | "length" | "stop_sequence" | "context"
    prompt_tokens: int
    prefilled_tokens: int  # prompt tokens that were not already in the cache
    prefill_s: float
    decode_s: float
    logprobs: list[TokenLogprob] | None = None  # one per generated token, when asked for
    prompt_logprobs: list[TokenLogprob | None] | None = None  # one per prompt token (None for the first)
    grammar_complete: bool | None = None  # with a grammar: whether the text is a complete sentence of it

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefilled_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        # the first token comes out of the prefill; the decode steps produce the rest
        steps = max(len(self.tokens) - 1, 0)
        return steps / self.decode_s if self.decode_s > 0 else 0.0


@dataclass
class StopMatcher:
    """Holds back text that might be the start of a stop string, so a stop string is never printed."""

    stops: list[str]
    pending: str = ""
    text: list[str] = field(default_factory=list)

    def feed(self, piece: str) -> tuple[str, bool]:
        """Returns (text safe to emit now, whether a stop string was found)."""
        buf = self.pending + piece
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.pending = ""
            return self._emit(buf[: min(hits)]), True
        keep = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:n]):
                    keep = n
                    break
        self.pending = buf[len(buf) - keep :]
        return self._emit(buf[: len(buf) - keep]), False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return self._emit(out)

    def _emit(self, s: str) -> str:
        self.text.append(s)
        return s


class Reply:
    """One reply as its tokens are sampled: the text each adds (a possible stop string held back), the tokens so far,
    and why it ends. Every decode loop (the full path, the quick path, a batch's rows) ends a reply by these rules:
    end of sequence "stop" (the token adds nothing); a stop string "stop_sequence"; the context full "context";
    `max_tokens` reached "length" (at once when it is 0)."""

    def __init__(self, options: GenerationOptions, stream: StreamDecoder, eos: int, context: int) -> None:
        self.stops = StopMatcher(options.stop)
        self.stream, self.eos, self.context, self.limit = stream, eos, context, options.max_tokens
        self.tokens: list[int] = []
        self.finish: str | None = "length" if self.limit == 0 else None

    def take(self, token: int, length: int) -> str | None:
        """A sampled token, with `length` tokens in the sequence before it: the text it adds, or None for the end of
        sequence. `finish` is set when this token ends the reply."""
        if token == self.eos:
            self.finish = "stop"
            return None
        self.tokens.append(token)
        text, hit = self.stops.feed(self.stream.push(token))
        if hit:
            self.finish = "stop_sequence"
        elif length >= self.context:
            self.finish = "context"
        elif self.limit is not None and len(self.tokens) >= self.limit:
            self.finish = "length"
        return text

    def tail(self) -> str:
        """The text held back when the reply ended (the start of a stop string that never came, an unfinished
        character); nothing after a stop string."""
        if self.finish == "stop_sequence":
            return ""
        return self.stops.feed(self.stream.flush())[0] + self.stops.flush()

    @property
    def text(self) -> str:
        return "".join(self.stops.text)
