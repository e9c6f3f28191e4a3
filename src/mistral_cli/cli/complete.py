"""`mistral complete`: a prompt in, only the generated text out, made for shell pipelines.

stdout carries the text (UTF-8, streamed, newline-terminated) and nothing else; everything else goes to stderr.
Invalid UTF-8 on stdin is decoded with U+FFFD replacement and reported once on stderr, so a stray byte in a log
file does not stop a pipeline.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from mistral_cli.cli import banner
from mistral_cli.engine.events import Done
from mistral_cli.errors import MistralError, UsageError
from mistral_cli.options import GenerationOptions, LoadOptions

if TYPE_CHECKING:
    from mistral_cli.remote.client import RemoteEngine
    from mistral_cli.text.output_format import OutputFormat

MAX_INPUT_BYTES = 64 << 20  # stdin is read no further: far more text than any context holds (32768 x 25 bytes)


def read_prompt(prompt: str | None, *, keep_end: bool = False) -> str:
    """The prompt argument, or all of stdin (its last MAX_INPUT_BYTES with `keep_end`, else refused past that)."""
    if prompt is not None and prompt != "-":
        return prompt
    return _decode(_read_stdin(keep_end, "The prompt on stdin"), "stdin")


def _read_stdin(keep_end: bool, what: str) -> bytes:
    if sys.stdin is None:
        raise UsageError("No prompt: give one as an argument or on stdin.")
    if sys.stdin.isatty():
        sys.stderr.write("Reading the prompt from stdin; end it with Ctrl-D.\n")
    data = bytearray()
    while chunk := sys.stdin.buffer.read(1 << 20):
        data += chunk
        if len(data) > MAX_INPUT_BYTES:
            if not keep_end:
                raise MistralError(
                    f"{what} is over {MAX_INPUT_BYTES >> 20} MiB, far more than a context holds; pass --truncate "
                    "to keep its end, or send less."
                )
            del data[: len(data) - MAX_INPUT_BYTES]
            while data and 0x80 <= data[0] < 0xC0:  # not half a character
                del data[0]
    return bytes(data)


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        warn(f"{where} is not valid UTF-8; invalid bytes were replaced with U+FFFD.")
        return data.decode("utf-8", errors="replace")


def read_messages(path: Path, *, extend: bool = False) -> list:
    """A `--messages` conversation ready for generation (ending with a user message, or with `extend` an assistant
    message to continue); `-` reads it from stdin."""
    from mistral_cli.text.chat_format import load_messages, parse_conversation, validate_for_generation

    if str(path) == "-":
        conversation = parse_conversation(_read_stdin(False, "The conversation on stdin"), "The JSON on stdin")[0]
    else:
        conversation = load_messages(path)
    if not extend:
        validate_for_generation(conversation)
    elif not conversation or conversation[-1].role != "assistant" or not conversation[-1].content:
        raise UsageError("--continue extends the last message of --messages, which must be the assistant's.")
    return conversation


def read_line_messages(value: Any, where: str) -> list:
    """A conversation given as JSON data (a batch line's `messages`), ready for generation."""
    from mistral_cli.text.chat_format import parse_conversation, validate_for_generation

    conversation = parse_conversation(json.dumps(value).encode("utf-8"), where)[0]
    validate_for_generation(conversation)
    return conversation


def warn(message: str) -> None:
    sys.stderr.write(f"mistral: warning: {message}\n")


def build_prompt(
    tokenizer: Any, text: str | None, *, instruct: bool, system: str | None, messages: list | None,
    extend: bool = False,
) -> list[int]:  # fmt: skip
    """Token ids for the prompt kinds: raw (BOS + text), one instruct turn, a conversation, or (`extend`) a
    conversation whose last message, the assistant's, goes on."""
    from mistral_cli.text.chat_format import Message, encode_chat, encode_continuation

    if extend:
        return encode_continuation(tokenizer, messages or [], system=system)
    if messages is not None:
        return encode_chat(tokenizer, messages, system=system)
    if instruct:
        return encode_chat(tokenizer, [Message("user", text or "")], system=system)
    return [tokenizer.bos_id, *tokenizer.encode(text or "")]


def too_long(tokens: int, max_context: int, *, exact: bool = True) -> MistralError:
    size = f"{tokens:,} tokens" if exact else f"over {tokens:,} tokens"
    return MistralError(
        f"The prompt is {size}, but the context holds {max_context:,} (including the reply); shorten it, raise "
        "--max-context, or pass --truncate to drop its beginning."
    )


def check_length(tokenizer: Any, text: str | None, messages: list | None, max_context: int) -> None:
    """Refuse a prompt whose text alone cannot fit, having encoded no more of it than a context's worth."""
    if messages is not None:
        text = "\n\n".join(m.content for m in messages)
    if len(text or "") <= max_context * tokenizer.max_piece_bytes:
        return  # cheap to encode whole: the exact count is checked then
    n = tokenizer.count_at_least(text or "", max_context)
    if n is not None:
        raise too_long(n, max_context, exact=False)


def truncate_prompt(
    tokenizer: Any,
    text: str | None,
    context: int,
    max_tokens: int | None,
    *,
    instruct: bool,
    system: str | None,
    messages: list | None,
) -> tuple[list[int], str]:
    """The prompt with its start dropped so that it and the reply fit (text/conversation.py: the room a reply keeps,
    and the chat's rule for a conversation, whose oldest exchanges go first), or else the oldest tokens of the text;
    and a note saying what went. Text far beyond the budget is cut by length before anything is encoded."""
    from mistral_cli.text.conversation import drop_oldest, exchange_starts, prompt_budget, reply_room

    budget = prompt_budget(context, reply_room(max_tokens, context))
    enough = (budget + 2) * tokenizer.max_piece_bytes  # characters that hold at least `budget` tokens, and some
    if messages is not None:
        msgs = list(messages)
        starts = exchange_starts(msgs)

        def ids_from(k: int) -> list[int]:  # the system messages all stay, where they are
            kept = [m for i, m in enumerate(msgs) if i >= starts[k] or m.role == "system"]
            return build_prompt(tokenizer, None, instruct=False, system=system, messages=kept)

        first = 0  # exchanges whose later ones alone are too long go before anything is encoded
        while first < len(starts) - 1 and sum(len(m.content) for m in msgs[starts[first + 1] :]) > enough:
            first += 1
        ids = ids_from(first)
        keep_from, ids = drop_oldest(ids, lambda k: ids_from(first + k), len(starts) - first, budget)
        gone = first + keep_from
        return ids, f"dropped the oldest {gone} exchange{'s' * (gone != 1)} to fit the context" if gone else ""
    whole = text or ""
    cut = whole[-enough:] if len(whole) > enough else whole
    body = tokenizer.encode(cut)
    if not instruct:
        keep = min(len(body), budget - 1)  # BOS is the other one
        ids = [tokenizer.bos_id, *body[len(body) - keep :]]
    else:
        ids = build_prompt(tokenizer, cut, instruct=True, system=system, messages=None)
        overflow = len(ids) - budget
        if overflow >= len(body):
            return ids, ""  # the instruct frame alone does not fit; the caller reports it
        if overflow > 0:
            keep = len(body) - overflow
            ids = build_prompt(tokenizer, tokenizer.decode(body[overflow:]), instruct=True, system=system,
                               messages=None)  # fmt: skip
        else:
            keep = len(body)
    if keep == len(body) and cut is whole:
        return ids, ""
    return ids, f"dropped the beginning of the prompt to fit the context ({keep:,} of its tokens kept)"


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
    remote: RemoteEngine | None = None,
    output_format: OutputFormat | None = None,
    logprobs: int | None = None,
    extend: bool = False,
) -> None:
    opts = generation.with_seed()  # a random run can be repeated: the seed is reported
    if logprobs is not None and not json_out:
        raise UsageError("--logprobs reports in the --json object: add --json.")
    if extend and (messages is None or truncate):
        raise UsageError(
            "--continue needs --messages (ending with the assistant message to extend), without --truncate."
        )
    conversation = None
    if messages is not None:
        if prompt is not None:
            raise UsageError("Give either a PROMPT or --messages, not both.")
        conversation = read_messages(messages, extend=extend)
        text = None
    else:
        text = read_prompt(prompt, keep_end=truncate)
        if not text.strip():
            raise UsageError("The prompt is empty.")
        instruct = instruct or system is not None  # a system prompt only makes sense in the instruct format
    raw = conversation is None and not instruct

    engine: Any
    prompt_tokens = 0  # known here for a local model only
    if remote is None:
        from mistral_cli.engine.quick import QUICK_PROMPT

        # a short prompt with nothing that needs torch: answered from the prepared weights without it
        engine = _quick(model, loading, verbose) if output_format is None and logprobs is None else None
        if engine is not None:
            ids = _prompt_ids(engine, text, conversation, opts, instruct=instruct, system=system, truncate=truncate,
                              extend=extend)  # fmt: skip
            if len(ids) > QUICK_PROMPT[loading.quantize]:
                if verbose:
                    sys.stderr.write(f"mistral: loading torch (a prompt of {len(ids)} tokens)\n")
                engine = None
            elif verbose:
                _say_quick(engine, loading.quantize)
        if engine is None:
            engine = _load(model, loading, verbose)
            ids = _prompt_ids(engine, text, conversation, opts, instruct=instruct, system=system, truncate=truncate,
                              extend=extend)  # fmt: skip
        prompt_tokens = len(ids)
        # a prompt the quick path would take goes a token at a time here too: the same reply whichever path ran
        quick_sized = output_format is None and logprobs is None and len(ids) <= QUICK_PROMPT[loading.quantize]
        events = engine.generate(
            ids,
            opts,
            leading_space=raw or extend,  # a continuation follows text: its first space is real
            constraint=constraint_for(engine, output_format),
            logprobs=logprobs,
            prompt_logprobs=echo and logprobs is not None,
            token_by_token=quick_sized,
        )
    else:
        if logprobs is not None and echo:
            raise UsageError("--echo --logprobs scores the prompt with a local model, not with --server.")
        if truncate:
            sys.stderr.write("mistral: note: --truncate does nothing with --server: the server decides what fits.\n")
        engine = remote.connect() if remote.model is None else remote
        model = engine.model
        if verbose:
            sys.stderr.write(f"mistral: {model} on {engine.url}\n")
        if raw:
            events = engine.complete(text or "", opts, output_format=output_format, logprobs=logprobs)
        else:
            from mistral_cli.text.chat_format import Message

            events = engine.chat(
                conversation or [Message("user", text or "")], opts, system=system, output_format=output_format,
                extend=extend, logprobs=logprobs,
            )  # fmt: skip

    out = sys.stdout.buffer
    if echo and not json_out:
        _write(out, text if conversation is None else conversation[-1].content)
        if not raw:
            _write(out, "\n\n")
    last = ""
    came: list[Any] = []  # the chunks so far, for the --json object of an interrupted run
    started = time.perf_counter()
    try:
        with _reading_shown(engine, echo) as take_down:
            for event in _after(events, take_down):
                if isinstance(event, Done):
                    done = event
                else:
                    came.append(event)
                    if not json_out and event.text:
                        _write(out, event.text)
                        last = event.text
    except MistralError:
        if last and not last.endswith("\n"):
            _write(out, "\n")  # what came stays, on a line of its own
        raise
    except KeyboardInterrupt:
        if json_out:  # what was generated, said to be cut, so a script keeps it
            done = _interrupted(came, prompt_tokens, time.perf_counter() - started)
            _write(out, json.dumps(_json_result(done, engine, model, opts), ensure_ascii=False) + "\n")
        raise
    if done.grammar_complete is False:
        warn(f"the output ended ({done.finish_reason}) before the format of {output_format.origin} was complete; "
             "it may not parse. Raise --max-tokens.")  # fmt: skip
    if json_out:
        result = _json_result(done, engine, model, opts)
        if remote is not None:
            result["server"] = remote.url
        _write(out, json.dumps(result, ensure_ascii=False) + "\n")
    elif not last.endswith("\n"):
        _write(out, "\n")
    if verbose and remote is None:
        _report(done, engine)
    elif verbose:
        _report_remote(done)


def _reading_shown(engine: Any, echo: bool) -> Any:
    """The bar of a cold prepared file read from disk (cli/loading.py) for a local engine, on stderr when it is a
    terminal; not after --echo wrote the prompt to the same terminal, whose line the bar would take."""
    from contextlib import nullcontext

    reading = getattr(engine, "reading", None)
    if reading is None or reading.finished.is_set() or (echo and sys.stdout.isatty()) or not sys.stderr.isatty():
        return nullcontext(lambda: None)
    from rich.console import Console

    from mistral_cli.cli.loading import reading_shown

    return reading_shown(reading, Console(stderr=True, highlight=False))


def _after(events: Any, take_down: Any) -> Any:
    """The events, the bar taken down before the first."""
    for event in events:
        take_down()
        yield event


def constraint_for(engine: Any, output_format: OutputFormat | None) -> Any:
    """A grammar matcher for one generation in `output_format`, compiled for the engine's tokenizer; or None."""
    if output_format is None:
        return None
    from mistral_cli.engine.grammar import Grammar

    return Grammar(engine.tokenizer, output_format).matcher()


def _load(model: str, loading: LoadOptions, verbose: bool) -> Any:
    from rich.console import Console

    from mistral_cli.cli.loading import load
    from mistral_cli.hub.models import resolve_model

    paths = resolve_model(model)
    engine = load(paths, loading, Console(stderr=True, highlight=False))
    if verbose:
        sys.stderr.write(
            f"mistral: loaded {paths.folder} on {banner.hardware(engine)} in {engine.load_s:.2f} s "
            f"({engine.weights_note})\n"
        )
    return engine


def _quick(model: str, loading: LoadOptions, verbose: bool) -> Any:
    """The quick engine (engine/quick.py) when it takes this model and these options, else None (--verbose says
    why)."""
    from mistral_cli.engine.quick import open_quick
    from mistral_cli.hub.models import resolve_model

    if loading.device in ("auto", "cpu"):
        from mistral_cli.hardware import share_the_cpu

        share_the_cpu()  # before our library starts its threads
    try:
        paths = resolve_model(model)
    except MistralError:
        return None  # the full path says what is wrong
    engine = open_quick(paths.folder, loading)
    if isinstance(engine, str):
        if verbose:
            sys.stderr.write(f"mistral: loading torch ({engine})\n")
        return None
    return engine


def _say_quick(engine: Any, quantize: str) -> None:
    """--verbose's line for a run on the quick path."""
    from mistral_cli.hardware import SHARED_CPU

    n = engine.threads
    threads = f"{n} thread{'s' if n != 1 else ''}" + (f" ({SHARED_CPU})" if SHARED_CPU else "")
    quantized = "" if quantize == "none" else f" {quantize}"
    sys.stderr.write(
        f"mistral: loaded {engine.folder} on cpu bf16{quantized}, {engine.kernels_label}, {threads} in "
        f"{engine.load_s:.2f} s ({engine.weights_note})\n"
    )


def _prompt_ids(
    engine: Any,
    text: str | None,
    conversation: list | None,
    opts: GenerationOptions,
    *,
    instruct: bool,
    system: str | None,
    truncate: bool,
    extend: bool = False,
) -> list[int]:
    """The prompt's token ids for the local engine, cut to fit with `truncate`, else refused when too long."""
    tok = engine.tokenizer
    if truncate:
        ids, note = truncate_prompt(tok, text, engine.max_context, opts.max_tokens, instruct=instruct, system=system,
                                    messages=conversation)  # fmt: skip
        if note:
            sys.stderr.write(f"mistral: note: --truncate {note}.\n")
    else:
        check_length(tok, text, conversation, engine.max_context)
        ids = build_prompt(tok, text, instruct=instruct, system=system, messages=conversation, extend=extend)
    if len(ids) >= engine.max_context:
        raise too_long(len(ids), engine.max_context)
    return ids


def _write(out: BinaryIO, text: str) -> None:
    out.write(text.encode("utf-8"))
    out.flush()


def _interrupted(chunks: list[Any], prompt_tokens: int, seconds: float) -> Done:
    """A Done for a run stopped by Ctrl-C: the text and tokens that came, `finish_reason` "interrupted"."""
    tokens = [c.token for c in chunks if c.token >= 0]
    scored = [c.logprob for c in chunks if c.logprob is not None]
    return Done(
        text="".join(c.text for c in chunks),
        tokens=tokens,
        finish_reason="interrupted",
        prompt_tokens=prompt_tokens,
        prefilled_tokens=prompt_tokens,
        prefill_s=0.0,
        decode_s=seconds,
        logprobs=scored or None,
    )


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
        **_logprob_fields(done),
    }


def _logprob_fields(done: Any) -> dict[str, Any]:
    """`logprobs` in OpenAI's chat shape ({"content": [...]}) and, for --echo, `prompt_logprobs` (null first)."""
    fields: dict[str, Any] = {}
    if getattr(done, "logprobs", None) is not None:
        fields["logprobs"] = {"content": [t.to_dict() for t in done.logprobs]}
    if getattr(done, "prompt_logprobs", None) is not None:
        fields["prompt_logprobs"] = [None if t is None else t.to_dict() for t in done.prompt_logprobs]
    return fields


def _report_remote(done: Any) -> None:
    sys.stderr.write(
        f"mistral: prompt {done.prompt_tokens} tokens, first token after {done.prefill_s:.2f} s; "
        f"generated {done.completion_tokens} tokens in {done.decode_s:.2f} s ({done.decode_tokens_per_s:.1f} tokens/s); "
        f"finish: {done.finish_reason}\n"
    )


def _report(done: Any, engine: Any) -> None:
    weight_gb = engine.weight_bytes / 1e9
    sys.stderr.write(
        f"mistral: prompt {done.prefilled_tokens} tokens in {done.prefill_s:.2f} s "
        f"({done.prefill_tokens_per_s:.1f} tokens/s); "
        f"generated {done.completion_tokens} tokens in {done.decode_s:.2f} s "
        f"({done.decode_tokens_per_s:.1f} tokens/s, {done.decode_tokens_per_s * weight_gb:.1f} GB/s of weights); "
        f"finish: {done.finish_reason}\n"
    )
    pacer = getattr(engine, "pacer", None)
    if pacer is not None and (summary := pacer.summary()):
        sys.stderr.write(f"mistral: {summary}\n")
