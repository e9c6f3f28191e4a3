"""Conversations as plain data, their instruct-format tokens (mistral-common "v1"), and their JSON files.

Encoding follows `MistralTokenizer.v1().encode_chat_completion` token for token (docs/FORMAT.md section 5):
BOS once; every system message (non-empty ones, joined with "\\n\\n") goes in front of the first user turn;
consecutive messages of one role are joined with "\\n\\n" (empty ones skipped), a system message between them
still separates them; a conversation that does not start with a user turn gets an empty one first;
a user turn is `encode("[INST] " + content + " [/INST]")`, an assistant turn `encode(content) + [EOS]` (or, for a
reply the chat generated, the ids it sampled + [EOS]: see `Message.ids`).

Where mistral-common refuses a conversation we raise MistralError with one sentence: no messages, an empty
assistant message, a system message right after an assistant one.
One deliberate extension: a conversation may end with an assistant turn (a finished history, encoded up to its
EOS); that encoding is always a prefix of the same history plus the next user turn, so a chat can keep its cache.

File format (`--messages FILE`, chat's `/save` and `/load`): a JSON list of `{"role", "content"}` objects, so any
reader of the plain format can use a saved chat. `save_messages` puts its metadata under a "metadata" key of the
first message (readers ignore unknown keys; with no messages there is nothing to attach it to).
`load_messages` also accepts an object `{"messages": [...], "metadata": {...}, ...}`.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mistral_cli import atomic
from mistral_cli.errors import MistralError
from mistral_cli.text.tokenizer import Tokenizer
from mistral_cli.userfiles import read_bounded

ROLES = ("system", "user", "assistant")
_JOIN = "\n\n"


@dataclass
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str
    # An assistant reply's token ids as they were sampled: its turn is encoded as these ids (not the content's
    # encoding, which may differ) when the turn is this message alone, so the history is what the model saw.
    ids: tuple[int, ...] | None = field(default=None, compare=False, repr=False)


def validate_messages(messages: Sequence[Message]) -> None:
    """Raise MistralError if the v1 instruct format cannot encode `messages` (it may end with an assistant turn)."""
    _check(messages, first_index=0)


def validate_for_generation(messages: Sequence[Message]) -> None:
    """Raise MistralError unless `messages` is a prompt for the next assistant reply (it ends with a user turn)."""
    if not messages:
        raise MistralError("The conversation has no messages; it must end with a user message.")
    if messages[-1].role != "user":
        raise MistralError(
            f"The last message of the conversation has role {json.dumps(messages[-1].role)}; "
            "it must end with a user message for the model to answer."
        )


def encode_chat(tok: Tokenizer, messages: Sequence[Message], system: str | None = None) -> list[int]:
    """Token ids of a conversation in the v1 instruct format, `system` acting as a system message before it.

    Ending with a user turn gives the generation prompt (it ends right after "[/INST]"); ending with an assistant
    turn gives the finished history, up to and including that turn's EOS.
    """
    full = list(messages)
    if system is not None:
        full.insert(0, Message("system", system))
    _check(full, first_index=-1 if system is not None else 0)

    system_prompt = _JOIN.join(m.content for m in full if m.role == "system" and m.content)
    # One turn per run of same-role messages; system runs only split runs, their text went to system_prompt.
    turns: list[tuple[str, str, tuple[int, ...] | None]] = []
    for role, group in itertools.groupby(full, key=lambda m: m.role):
        if role != "system":
            run = list(group)
            turns.append((role, _JOIN.join(m.content for m in run if m.content), run[0].ids if len(run) == 1 else None))
    if not turns or turns[0][0] != "user":
        turns.insert(0, ("user", "", None))
    if system_prompt:
        turns[0] = ("user", system_prompt + _JOIN + turns[0][1], None)

    ids = [tok.bos_id]
    for role, content, sampled in turns:
        if role == "user":
            ids += tok.encode(f"[INST] {content} [/INST]")
        else:
            ids += tok.encode(content) if sampled is None else sampled
            ids.append(tok.eos_id)
    return ids


def encode_continuation(tok: Tokenizer, messages: Sequence[Message], system: str | None = None) -> list[int]:
    """The prompt that extends the last message, an assistant's cut short, in place: the conversation's tokens up to
    that turn's EOS, without it. These are the tokens the model saw while it wrote the message, so what it writes
    next is what it would have written had it not stopped (up to sampling)."""
    if not messages or messages[-1].role != "assistant" or not messages[-1].content:
        raise MistralError("There is no assistant message to continue: the conversation must end with one.")
    ids = encode_chat(tok, messages, system)
    return ids[:-1]  # the EOS that ends a finished turn


def load_messages(path: Path) -> list[Message]:
    """Read a `--messages` file; MistralError with one sentence naming the file and the problem."""
    return load_conversation(path)[0]


MAX_FILE_BYTES = 64 << 20  # a conversation file is read no further: far more text than any context holds


def load_conversation(path: Path) -> tuple[list[Message], dict[str, Any]]:
    """Like `load_messages`, also returning the metadata saved with it ({} when there is none)."""
    path = Path(path)
    what, advice = f"Messages file {path}", "far more than a context holds; keep its last messages"
    return parse_conversation(read_bounded(path, what, MAX_FILE_BYTES, advice), what)


def parse_conversation(data: bytes, source: str) -> tuple[list[Message], dict[str, Any]]:
    """A conversation from the bytes of a messages file; `source` names it in errors ("Messages file x.json")."""
    if len(data) > MAX_FILE_BYTES:
        raise MistralError(
            f"{source} is over {MAX_FILE_BYTES >> 20} MiB, far more than a context holds; keep its last messages."
        )
    try:
        text = data.decode("utf-8-sig")  # -sig: tolerate the BOM some editors write
    except UnicodeDecodeError as e:
        raise MistralError(f"{source} is not UTF-8 text (bad byte at offset {e.start}).") from None
    try:
        loaded = json.loads(text)
    except json.JSONDecodeError as e:
        raise MistralError(f"{source} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}.") from None
    except RecursionError:  # json's parser recurses once per level of nesting
        raise MistralError(f"{source} is nested too deeply to be a conversation.") from None
    try:
        return _from_json(loaded)
    except MistralError as e:
        problem = str(e)
        raise MistralError(f"{source}: {problem[:1].lower()}{problem[1:]}") from None


def save_messages(path: Path, messages: Sequence[Message], metadata: dict[str, Any] | None = None) -> None:
    """Write `messages` as the `--messages` JSON list, `metadata` riding on the first message (see module doc)."""
    items: list[dict[str, Any]] = [{"role": m.role, "content": m.content} for m in messages]
    if metadata and items:
        items[0]["metadata"] = metadata
    text = json.dumps(items, ensure_ascii=False, indent=2) + "\n"
    try:
        atomic.write_text(Path(path), text)
    except OSError as e:
        raise MistralError(f"Cannot write messages file {path}: {e.strerror or e}.") from None


def _from_json(data: Any) -> tuple[list[Message], dict[str, Any]]:
    metadata: Any = None
    if isinstance(data, dict) and isinstance(data.get("messages"), list):
        metadata = data.get("metadata")
        data = data["messages"]
    if not isinstance(data, list):
        raise MistralError(
            'it must hold a JSON list of {"role": ..., "content": ...} objects '
            '(or an object with such a list under "messages").'
        )
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise MistralError(f'messages[{i}] is not an object with "role" and "content".')
    messages = [Message(item.get("role"), item.get("content")) for item in data]
    if metadata is None and data and isinstance(data[0], dict):
        metadata = data[0].get("metadata")
    validate_messages(messages)
    return messages, metadata if isinstance(metadata, dict) else {}


def _check(messages: Sequence[Message], first_index: int) -> None:
    """What mistral-common refuses, as one sentence; `first_index` numbers messages as the user sees them."""
    if not messages:
        raise MistralError("The conversation has no messages.")
    previous = None
    for i, m in enumerate(messages, start=first_index):
        if m.role not in ROLES:
            raise MistralError(
                f"messages[{i}] has unknown role {json.dumps(m.role)} (expected system, user or assistant)."
            )
        if not isinstance(m.content, str):
            raise MistralError(f'messages[{i}] ({m.role}) has no string "content".')
        if m.role == "assistant" and not m.content:
            raise MistralError(f"messages[{i}] is an empty assistant message, which the instruct format cannot encode.")
        if m.role == "system" and previous == "assistant":
            raise MistralError(
                f"messages[{i}] is a system message right after an assistant message, which the instruct format "
                "does not allow; put system prompts before the conversation."
            )
        previous = m.role
