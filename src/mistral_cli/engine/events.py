"""What generation yields, a `Chunk` per token and one `Done`, without torch: a server's stream (remote/) yields
the same objects, so the chat and `complete` read both alike and a remote run never imports torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Chunk:
    text: str  # may be "" while a multi-byte character or a possible stop string is pending
    token: int  # -1: text with no token id of its own (the held-back tail; a server's stream sends no ids)


@dataclass
class Done:
    text: str
    tokens: list[int]  # from a server: one -1 per token it counted
    finish_reason: str  # "stop" | "length" | "stop_sequence" | "context"
    prompt_tokens: int
    prefilled_tokens: int  # prompt tokens that were not already in the cache
    prefill_s: float
    decode_s: float

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
