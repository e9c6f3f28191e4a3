"""`mistral complete`: a prompt in, only the generated text out, made for shell pipelines.

stdout carries the text (UTF-8, streamed, newline-terminated) and nothing else; everything else goes to stderr.
Invalid UTF-8 on stdin is decoded with U+FFFD replacement and reported once on stderr, so a stray byte in a log
file does not stop a pipeline.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, BinaryIO

from mistral_cli.cli import banner
from mistral_cli.errors import MistralError, UsageError
from mistral_cli.options import GenerationOptions, LoadOptions


def read_prompt(prompt: str | None) -> str:
    if prompt is not None and prompt != "-":
        return prompt
    if sys.stdin is None:
        raise UsageError("No prompt: give one as an argument or on stdin.")
    if sys.stdin.isatty():
        sys.stderr.write("Reading the prompt from stdin; end it with Ctrl-D.\n")
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        warn("stdin is not valid UTF-8; invalid bytes were replaced with U+FFFD.")
        return data.decode("utf-8", errors="replace")


def warn(message: str) -> None:
    sys.stderr.write(f"mistral: warning: {message}\n")


def build_prompt(tokenizer: Any, text: str | None, *, instruct: bool, system: str | None, messages: list | None):
    """Token ids for the three prompt kinds: raw (BOS + text), one instruct turn, or a conversation."""
    from mistral_cli.text.chat_format import Message, encode_chat

    if messages is not None:
        return encode_chat(tokenizer, messages, system=system)
    if instruct:
        return encode_chat(tokenizer, [Message("user", text or "")], system=system)
    return [tokenizer.bos_id, *tokenizer.encode(text or "")]


def truncate_prompt(
    tokenizer: Any,
    ids: list[int],
    text: str | None,
    context: int,
    max_tokens: int | None,
    *,
    instruct: bool,
    system: str | None,
    messages: list | None,
) -> list[int]:
    """Drop the start of the prompt so that it and the reply fit (text/conversation.py: the room a reply keeps, and
    the chat's rule for a conversation, whose oldest exchanges go first), or else the oldest tokens of the text."""
    from mistral_cli.text.conversation import drop_oldest, exchange_starts, prompt_budget, reply_room

    budget = prompt_budget(context, reply_room(max_tokens, context))
    if messages is not None:
        msgs = list(messages)
        starts = exchange_starts(msgs)

        def ids_from(k: int) -> list[int]:  # the system messages all stay, where they are
            kept = [m for i, m in enumerate(msgs) if i >= starts[k] or m.role == "system"]
            return build_prompt(tokenizer, None, instruct=False, system=system, messages=kept)

        return drop_oldest(ids, ids_from, len(starts), budget)[1]
    if not instruct:
        return [tokenizer.bos_id, *ids[len(ids) - budget + 1 :]]
    body = tokenizer.encode(text or "")
    overflow = len(ids) - budget
    if overflow >= len(body):
        return ids  # the instruct frame alone does not fit; the caller reports it
    kept = tokenizer.decode(body[overflow:])
    return build_prompt(tokenizer, kept, instruct=True, system=system, messages=None)


def run_complete(
    *,
    prompt: str | None,
    model: str,
    generation: GenerationOptions,
    loading: LoadOptions,
    verbose: bool,
    instruct: bool,
    system: str | None,
    messages: Path | None,
    json_out: bool,
    echo: bool,
    truncate: bool = False,
) -> None:
    opts = generation.with_seed()  # a random run can be repeated: the seed is reported
    conversation = None
    if messages is not None:
        if prompt is not None:
            raise UsageError("Give either a PROMPT or --messages, not both.")
        from mistral_cli.text.chat_format import load_messages, validate_for_generation

        conversation = load_messages(messages)
        validate_for_generation(conversation)
        text = None
    else:
        text = read_prompt(prompt)
        if not text.strip():
            raise UsageError("The prompt is empty.")
        instruct = instruct or system is not None  # a system prompt only makes sense in the instruct format

    from mistral_cli.engine.engine import Done
    from mistral_cli.engine.load import load_engine
    from mistral_cli.hub.models import resolve_model

    paths = resolve_model(model)
    engine = load_engine(paths.folder, loading)
    if verbose:
        sys.stderr.write(f"mistral: loaded {paths.folder} on {banner.hardware(engine)} in {engine.load_s:.2f} s\n")
    ids = build_prompt(engine.tokenizer, text, instruct=instruct, system=system, messages=conversation)
    if truncate and len(ids) >= engine.max_context:
        ids = truncate_prompt(
            engine.tokenizer,
            ids,
            text,
            engine.max_context,
            opts.max_tokens,
            instruct=instruct,
            system=system,
            messages=conversation,
        )
    if len(ids) >= engine.max_context:
        raise MistralError(
            f"The prompt is {len(ids)} tokens, but the context holds {engine.max_context} (including the reply); "
            "shorten the prompt or raise --max-context."
        )

    out = sys.stdout.buffer
    if echo and not json_out:
        _write(out, text if conversation is None else conversation[-1].content)
        if instruct or conversation is not None:
            _write(out, "\n\n")
    raw = conversation is None and not instruct
    last = ""
    for event in engine.generate(ids, opts, leading_space=raw):
        if isinstance(event, Done):
            done = event
        elif not json_out and event.text:
            _write(out, event.text)
            last = event.text
    if json_out:
        _write(out, json.dumps(_json_result(done, engine, model, opts), ensure_ascii=False) + "\n")
    elif not last.endswith("\n"):
        _write(out, "\n")
    if verbose:
        _report(done, engine)


def _write(out: BinaryIO, text: str) -> None:
    out.write(text.encode("utf-8"))
    out.flush()


def _json_result(done: Any, engine: Any, model: str, opts: GenerationOptions) -> dict[str, Any]:
    return {
        "text": done.text,
        "finish_reason": done.finish_reason,
        "usage": {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens},
        "timings": {
            "load_s": round(engine.load_s, 4),
            "prefill_s": round(done.prefill_s, 4),
            "decode_s": round(done.decode_s, 4),
            "prefill_tokens_per_s": round(done.prefill_tokens_per_s, 2),
            "decode_tokens_per_s": round(done.decode_tokens_per_s, 2),
        },
        "model": model,
        "seed": opts.seed,
        "options": opts.to_dict(),
    }


def _report(done: Any, engine: Any) -> None:
    weight_gb = engine.model.decode_bytes() / 1e9
    sys.stderr.write(
        f"mistral: prompt {done.prefilled_tokens} tokens in {done.prefill_s:.2f} s "
        f"({done.prefill_tokens_per_s:.1f} tokens/s); "
        f"generated {done.completion_tokens} tokens in {done.decode_s:.2f} s "
        f"({done.decode_tokens_per_s:.1f} tokens/s, {done.decode_tokens_per_s * weight_gb:.1f} GB/s of weights); "
        f"finish: {done.finish_reason}\n"
    )
