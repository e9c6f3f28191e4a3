"""The history of one chat, apart from any terminal or network: exchanges, system prompt, exact token counts.

A conversation is a system prompt and a list of exchanges (a user message and the reply to it). Its token ids are
always `encode_chat` of the current history, so the engine's prefix matching decides what the key/value cache can
keep. A reply the model generated keeps the ids it sampled: encoding its text again may give other ids (the same
text has many tokenizations), which would make the next turn read the whole reply again, and would not be what the
model saw. Only `/save` and `/load` go through the text. Before a turn that would not fit in the context, the oldest exchanges are dropped (the system prompt stays);
they are kept aside so `/save` still writes the whole conversation.

An empty reply cannot be encoded in the instruct format; such an exchange stays in the history (for `/retry` and
`/undo`) but its reply is left out of the encoding, which then joins the two user messages around it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mistral_cli.errors import MistralError
from mistral_cli.text.chat_format import Message, encode_chat, load_conversation, save_messages
from mistral_cli.text.tokenizer import Tokenizer

DEFAULT_REPLY_ROOM = 1024  # tokens kept free for a reply when --max-tokens is not set
_JOIN = "\n\n"  # how the instruct format joins consecutive messages of one role

# Finish reasons that leave a reply incomplete, and how the chat names them.
CUT_REASONS = {
    "interrupted": "interrupted",
    "length": "max tokens reached",
    "context": "context full",
    "error": "stopped by an error",
}


@dataclass
class Exchange:
    user: str
    reply: str | None = None  # None: not answered (yet)
    finish: str | None = None  # the engine's finish reason, or "interrupted" / "error"
    reply_ids: tuple[int, ...] | None = None  # the reply's ids as sampled, when they are exactly its text

    @property
    def cut(self) -> bool:
        return self.finish in CUT_REASONS


@dataclass
class Prompt:
    """What to feed the engine for the next reply, and what had to go to make it fit."""

    ids: list[int]
    dropped: list[Exchange] = field(default_factory=list)
    dropped_tokens: int = 0


class _MemoTokenizer:
    """Encodes each text once: fitting re-encodes the history many times, and its turns rarely change."""

    def __init__(self, tok: Tokenizer) -> None:
        self.inner = tok
        self.bos_id, self.eos_id = tok.bos_id, tok.eos_id
        self._memo: dict[str, tuple[int, ...]] = {}

    def encode(self, text: str) -> list[int]:
        ids = self._memo.get(text)
        if ids is None:
            if len(self._memo) > 20_000:
                self._memo.clear()
            ids = self._memo[text] = tuple(self.inner.encode(text))
        return list(ids)


# ----------------------------------------------------------------------------------------------------- fitting a prompt
# One policy for the chat and for `mistral complete --truncate`: the room kept for the reply, and which part of a
# conversation goes first when it does not fit.


def reply_room(max_tokens: int | None, max_context: int) -> int:
    """Tokens to keep free for the next reply: --max-tokens, or a default, at most half the context."""
    want = DEFAULT_REPLY_ROOM if max_tokens is None else max_tokens
    return max(1, min(want, max_context // 2))


def prompt_budget(max_context: int, room: int) -> int:
    """Tokens a prompt may take so that `room` tokens of the context stay free for the reply."""
    return max(max_context - room, 1)


def drop_oldest(
    ids: list[int], ids_from: Callable[[int], list[int]], exchanges: int, budget: int, *, spare: int = 0
) -> tuple[int, list[int]]:
    """Fit a history of `exchanges` exchanges in `budget` tokens by dropping its oldest exchanges one at a time; the
    last one always stays (one that does not fit alone is for the caller to report). `ids`: the whole history's
    tokens; `ids_from(k)`: those of the history from exchange k on. When something has to go, `spare` tokens more
    are freed. Returns the first exchange kept and the tokens from it on."""
    keep_from = 0
    if len(ids) > budget:
        budget = max(budget - spare, 1)
    while len(ids) > budget and keep_from < exchanges - 1:
        keep_from += 1
        ids = ids_from(keep_from)
    return keep_from, ids


def exchange_starts(messages: Sequence[Message]) -> list[int]:
    """Where each exchange of a message list begins, as the chat groups messages into exchanges (`load`): at the
    first user or assistant message, then at each user message that follows an assistant one. System messages
    belong to no exchange."""
    starts: list[int] = []
    previous = None
    for i, m in enumerate(messages):
        if m.role == "system":
            continue
        if previous is None or (m.role == "user" and previous == "assistant"):
            starts.append(i)
        previous = m.role
    return starts


def _join(*parts: str) -> str:
    return _JOIN.join(p for p in parts if p)


class Conversation:
    def __init__(self, tokenizer: Tokenizer, system: str | None = None) -> None:
        self.tok = _MemoTokenizer(tokenizer)
        self.system = system or None
        self.exchanges: list[Exchange] = []
        self.archived: list[Exchange] = []  # dropped from the context to make room; /save still writes them

    # ------------------------------------------------------------------------------------------------ encoding

    def messages(self, exchanges: Sequence[Exchange] | None = None) -> list[Message]:
        """The exchanges as instruct-format messages (without the system prompt); empty replies left out."""
        out: list[Message] = []
        for ex in self.exchanges if exchanges is None else exchanges:
            out.append(Message("user", ex.user))
            if ex.reply:
                out.append(Message("assistant", ex.reply, ex.reply_ids))
        return out

    def ids(self, exchanges: Sequence[Exchange] | None = None) -> list[int]:
        """Token ids of the history (ending with the last reply's EOS, or after "[/INST]" if it is unanswered)."""
        messages = self.messages(exchanges)
        if not messages:
            if self.system is None:
                return []
            messages = [Message("user", "")]  # what the system prompt costs before the first message
        return encode_chat(self.tok, messages, system=self.system)  # type: ignore[arg-type]

    def check_system(self, max_context: int, room: int) -> None:
        """Raise MistralError when the system prompt alone leaves no room for a message and its reply."""
        if self.system is None:
            return
        alone = len(self.ids([]))
        if alone >= prompt_budget(max_context, room):
            raise MistralError(
                f"The system prompt is {alone} tokens with the instruct format; with {room} tokens kept for the "
                f"reply, the context of {max_context} tokens has no room for a message: shorten it or raise "
                "--max-context."
            )

    def tokens_used(self) -> int:
        """Tokens of the history (after a reply that filled the context: two more than it, the last token and EOS)."""
        return len(self.ids())

    # ------------------------------------------------------------------------------------------------- turns

    def ask(self, text: str, max_context: int, room: int) -> Prompt:
        """Add a user message; the prompt that asks for its reply, old exchanges dropped if needed."""
        self.exchanges.append(Exchange(text))
        try:
            return self._fit(max_context, room)
        except MistralError:
            self.exchanges.pop()
            raise

    def retry(self, max_context: int, room: int) -> Prompt:
        """Forget the last reply; the prompt that asks for it again."""
        if not self.exchanges:
            raise MistralError("There is no message to answer again yet.")
        last = self.exchanges[-1]
        before = (last.reply, last.finish, last.reply_ids)
        last.reply, last.finish, last.reply_ids = None, None, None
        try:
            return self._fit(max_context, room)
        except MistralError:
            last.reply, last.finish, last.reply_ids = before
            raise

    def answer(self, text: str, finish: str, ids: Sequence[int] = ()) -> None:
        """Record the reply to the last message (partial when `finish` is a cut reason). `ids`: the tokens sampled
        for it, kept as its encoding when they decode to exactly `text` (not when a stop string was cut off)."""
        last = self.exchanges[-1]
        last.reply, last.finish = text, finish
        last.reply_ids = tuple(ids) if ids and self.tok.inner.decode(ids) == text else None

    def extend(self, max_context: int, room: int) -> Prompt:
        """The prompt that goes on with the last reply where it stopped: the history up to that reply's end, without
        the EOS that would close it, so the model sees what it saw while writing it (old exchanges dropped if
        needed)."""
        if not self.exchanges or not self.exchanges[-1].reply:
            raise MistralError("There is no reply to continue yet.")
        prompt = self._fit(max_context, room)
        return Prompt(prompt.ids[:-1], prompt.dropped, prompt.dropped_tokens)

    def answer_more(self, text: str, finish: str, ids: Sequence[int] = ()) -> None:
        """Add `text` (sampled as `ids`) to the end of the last reply, which `extend` went on with."""
        last = self.exchanges[-1]
        last.finish = finish
        if not text and not ids:
            return
        before = last.reply_ids if last.reply_ids is not None else tuple(self.tok.encode(last.reply or ""))
        last.reply = (last.reply or "") + text
        whole = (*before, *ids)
        last.reply_ids = whole if ids and self.tok.inner.decode(list(whole)) == last.reply else None

    def undo(self) -> Exchange | None:
        """Drop the last exchange; None when there is none."""
        return self.exchanges.pop() if self.exchanges else None

    def clear(self) -> None:
        self.exchanges.clear()
        self.archived.clear()

    def _fit(self, max_context: int, room: int) -> Prompt:
        full = self.ids()
        # Dropping from the start moves every position, so the whole rest is prefilled again: free a quarter of the
        # context more than needed, so that the next turns reuse the cache instead of paying that each time.
        keep_from, ids = drop_oldest(
            full,
            lambda k: self.ids(self.exchanges[k:]),
            len(self.exchanges),
            prompt_budget(max_context, room),
            spare=max_context // 4,
        )
        if len(ids) >= max_context:  # not even the last message alone leaves room for one token of reply
            own = len(self.tok.encode(self.exchanges[-1].user))
            extra = "the system prompt and " if self.system else ""
            raise MistralError(
                f"This message is {own} tokens ({len(ids)} with {extra}the instruct format); the context holds "
                f"{max_context} tokens, reply included: shorten it or raise --max-context."
            )
        dropped = self.exchanges[:keep_from]
        del self.exchanges[:keep_from]
        self.archived += dropped
        return Prompt(ids, dropped, len(full) - len(ids))

    # ------------------------------------------------------------------------------------------------- files

    def save(self, path: Path, metadata: dict[str, Any] | None = None) -> int:
        """Write the whole conversation (dropped exchanges too) as a `--messages` file; returns the message count."""
        messages = [Message("system", self.system)] if self.system else []
        cut: list[dict[str, Any]] = []
        for ex in [*self.archived, *self.exchanges]:
            messages.append(Message("user", ex.user))
            if ex.reply:
                if ex.cut:
                    cut.append({"message": len(messages), "finish_reason": ex.finish})
                messages.append(Message("assistant", ex.reply))
        if not messages:
            raise MistralError("There is nothing to save yet.")
        save_messages(path, messages, {**(metadata or {}), "cut": cut})
        return len(messages)

    def load(self, path: Path) -> dict[str, Any]:
        """Replace the history (and system prompt) with a saved conversation; returns its metadata."""
        messages, metadata = load_conversation(path)
        cut = {}
        items = metadata.get("cut")
        for item in items if isinstance(items, list) else []:  # metadata from elsewhere may be anything
            if isinstance(item, dict) and isinstance(item.get("message"), int):
                cut[item["message"]] = str(item.get("finish_reason") or "interrupted")
        self.system = _join(*(m.content for m in messages if m.role == "system")) or None
        self.exchanges, self.archived = [], []
        for i, m in enumerate(messages):
            # Runs of one role become one message, as the instruct format reads them: the ids stay the same.
            last = self.exchanges[-1] if self.exchanges else None
            if m.role == "user":
                if last is not None and last.reply is None:
                    last.user = _join(last.user, m.content)
                else:
                    self.exchanges.append(Exchange(m.content))
            elif m.role == "assistant":
                if last is None:
                    last = Exchange("")
                    self.exchanges.append(last)
                last.reply = _join(last.reply or "", m.content)
                last.finish = cut.get(i, last.finish if last.finish in CUT_REASONS else "stop")
        return metadata
