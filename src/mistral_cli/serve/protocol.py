"""The OpenAI API as `mistral serve` speaks it: request bodies checked into our own types, and the answers in OpenAI's
shapes, which the official `openai` client parses. Pure data: no HTTP and no engine here.

A request's prompt is built as `mistral complete` builds it, so a served answer equals the command's with the same
options and seed: a chat is the instruct format of text/chat_format.py (`--messages`), a raw completion BOS and the
text (generated with a leading space, as `complete` does). Where a field is absent OpenAI's default applies
(temperature 1, top_p 1, no token limit), not our command line's. Our sampler's extras, `top_k`, `min_p` and
`repeat_penalty` (or vLLM's `repetition_penalty`), come as extra fields of the body.

Every refusal is an `ApiError`: an HTTP status and one sentence, sent as OpenAI's error object.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any

from mistral_cli.engine.events import TokenLogprob
from mistral_cli.errors import MistralError
from mistral_cli.options import GenerationOptions, OptionError
from mistral_cli.text.chat_format import (
    Message,
    encode_chat,
    encode_continuation,
    validate_for_generation,
    validate_messages,
)
from mistral_cli.text.output_format import OutputFormat, from_response_format
from mistral_cli.text.tokenizer import Tokenizer

MAX_LOGPROBS = 20  # alternatives per token, as OpenAI allows

# The engine's finish reasons (engine/events.py Done) in OpenAI's two words.
FINISH = {"stop": "stop", "stop_sequence": "stop", "length": "length", "context": "length"}
DONE = b"data: [DONE]\n\n"
_KINDS = {str: "a string", int: "an integer", float: "a number", bool: "true or false", dict: "an object"}


class ApiError(Exception):
    """A request refused: its HTTP status and OpenAI's error object."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None,
        kind: str = "invalid_request_error", headers: dict[str, str] | None = None,
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Request:
    """A checked request of either endpoint: `messages` for a chat, `prompt` for a raw completion."""

    chat: bool
    messages: list[Message] | None
    prompt: str | None
    options: GenerationOptions
    stream: bool
    include_usage: bool
    logprobs: int | None = None  # alternatives per token; None: no log-probabilities
    echo: bool = False  # a completion's prompt comes back before its text (with logprobs: scored)
    output_format: OutputFormat | None = None
    extend: bool = False  # a chat's last message, the assistant's, goes on (continue_final_message)

    def prompt_ids(self, tok: Tokenizer, max_context: int) -> list[int]:
        """The prompt's token ids, as `mistral complete` builds them; refused when it leaves no room for a reply.
        Text far longer than the context is refused before it is encoded whole."""
        text = self.prompt if self.messages is None else "\n\n".join(m.content for m in self.messages)
        if len(text or "") > max_context * tok.max_piece_bytes:
            n = tok.count_at_least(text or "", max_context)
            if n is not None:
                raise too_long(n, max_context, self.chat, exact=False)
        if self.messages is not None and self.extend:
            ids = encode_continuation(tok, self.messages)
        elif self.messages is not None:
            ids = encode_chat(tok, self.messages)
        else:
            ids = [tok.bos_id, *tok.encode(self.prompt or "")]
        if len(ids) >= max_context:
            raise too_long(len(ids), max_context, self.chat)
        return ids


def too_long(tokens: int, max_context: int, chat: bool, *, exact: bool = True) -> ApiError:
    size = f"{tokens:,} tokens" if exact else f"over {tokens:,} tokens"
    return ApiError(
        400,
        f"The prompt is {size}, but the context holds {max_context:,} (including the reply); shorten it.",
        param="messages" if chat else "prompt",
        code="context_length_exceeded",
    )


# ---------------------------------------------------------------------------------------------------- requests


def parse_body(data: bytes) -> dict[str, Any]:
    try:
        body = json.loads(data)
    except UnicodeDecodeError:
        raise ApiError(400, "The request body is not UTF-8 text.") from None
    except json.JSONDecodeError as e:
        raise ApiError(
            400, f"The request body is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}."
        ) from None
    except RecursionError:
        raise ApiError(400, "The request body is nested too deeply.") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    return body


def parse_chat(body: dict[str, Any]) -> Request:
    """A POST /v1/chat/completions body."""
    _unsupported(body, chat=True)
    max_tokens = _field(body, "max_completion_tokens", int)
    if max_tokens is None:
        max_tokens = _field(body, "max_tokens", int)
    extend = bool(_field(body, "continue_final_message", bool))  # vLLM's: more of a last, assistant message
    messages = _messages(body.get("messages"), extend=extend)
    request = _with(_request(body, chat=True, messages=messages, prompt=None, max_tokens=max_tokens), extend=extend)
    top = _field(body, "top_logprobs", int)
    if _field(body, "logprobs", bool):
        return _with(request, logprobs=_top(top or 0, "top_logprobs"))
    if top:
        raise ApiError(400, "top_logprobs needs logprobs: true.", param="top_logprobs")
    return request


def parse_completion(body: dict[str, Any]) -> Request:
    """A POST /v1/completions body."""
    _unsupported(body, chat=False)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        raise ApiError(400, "Send one prompt per request: this server makes one completion at a time.",
                       param="prompt", code="unsupported_value")  # fmt: skip
    if isinstance(prompt, list) and prompt and all(isinstance(p, (int, list)) for p in prompt):
        raise ApiError(400, "Prompts of token ids are not supported: send the prompt as text.", param="prompt",
                       code="unsupported_value")  # fmt: skip
    if not isinstance(prompt, str):
        raise ApiError(400, "'prompt' must be a string.", param="prompt")
    request = _request(body, chat=False, messages=None, prompt=prompt, max_tokens=_field(body, "max_tokens", int))
    top = _field(body, "logprobs", int)  # the completions API's: how many alternatives, 0 for the token's own only
    return _with(
        request, logprobs=None if top is None else _top(top, "logprobs"), echo=bool(_field(body, "echo", bool))
    )


def _top(n: int, name: str) -> int:
    if not 0 <= n <= MAX_LOGPROBS:
        raise ApiError(400, f"{name} must be between 0 and {MAX_LOGPROBS}, not {n}.", param=name)
    return n


def _with(request: Request, **changes: Any) -> Request:
    request = replace(request, **changes)
    if request.echo and request.stream and request.logprobs is not None:
        raise ApiError(400, "A scored echo (echo with logprobs) is sent whole: leave out stream.", param="echo")
    return request


def _output_format(body: dict[str, Any]) -> OutputFormat | None:
    """OpenAI's `response_format`, or vLLM's `guided_json` / `guided_regex` / `guided_grammar` extra fields."""
    given = [name for name in ("response_format", "guided_json", "guided_regex", "guided_grammar")
             if body.get(name) is not None]  # fmt: skip
    if len(given) > 1:
        raise ApiError(400, f"Send one of {' and '.join(given)}.", param=given[1])
    try:
        if "guided_json" in given:
            schema = body["guided_json"]
            return from_response_format({"type": "json_schema", "json_schema": {"name": "guided_json", "schema":
                                         json.loads(schema) if isinstance(schema, str) else schema}})  # fmt: skip
        if "guided_regex" in given or "guided_grammar" in given:
            name = given[0]
            value = _field(body, name, str)
            return OutputFormat("regex" if name == "guided_regex" else "grammar", value, name)
        return from_response_format(body.get("response_format"))
    except (ValueError, TypeError) as e:
        raise ApiError(400, str(e), param=given[0] if given else None) from None


def _request(
    body: dict[str, Any], *, chat: bool, messages: list[Message] | None, prompt: str | None, max_tokens: int | None
) -> Request:
    _field(body, "model", str)  # any name is answered by the one model served
    n = _field(body, "n", int)
    if n not in (None, 1):
        raise ApiError(400, f"n must be 1, not {n}: this server makes one completion per request.", param="n",
                       code="unsupported_value")  # fmt: skip
    stream = bool(_field(body, "stream", bool))
    stream_options = _field(body, "stream_options", dict) or {}
    include_usage = _field(stream_options, "include_usage", bool, "stream_options.include_usage")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    elif stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise ApiError(400, "'stop' must be a string or a list of strings.", param="stop")
    penalty = _field(body, "repeat_penalty", float)
    alias = _field(body, "repetition_penalty", float)
    if penalty is not None and alias is not None and penalty != alias:
        raise ApiError(400, "repeat_penalty and repetition_penalty differ; send one of them.", param="repeat_penalty")
    values = {
        "max_tokens": max_tokens,
        "temperature": _field(body, "temperature", float),
        "top_p": _field(body, "top_p", float),
        "top_k": _field(body, "top_k", int),
        "min_p": _field(body, "min_p", float),
        "repeat_penalty": penalty if penalty is not None else alias,
        "seed": _field(body, "seed", int),
        "stop": stop,
    }
    defaults = {"temperature": 1.0, "top_p": 1.0}  # OpenAI's, where ours differ
    given = {k: v for k, v in values.items() if v is not None}
    try:
        options = GenerationOptions(**{**defaults, **given}).with_seed()  # a request without a seed is random
    except OptionError as e:
        # the sentence names the command-line option; here the field is meant
        raise ApiError(400, str(e).replace(f"--{e.option.replace('_', '-')}", e.option, 1), param=e.option) from None
    return Request(chat, messages, prompt, options, stream, bool(include_usage), output_format=_output_format(body))


def _field(body: dict[str, Any], name: str, kind: type, shown: str | None = None) -> Any:
    """`body[name]` if it is of `kind` (an integer passes for a number), None when absent or null."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) == (kind is bool):
        if kind is float and isinstance(value, int):
            return float(value)
        if isinstance(value, kind):
            return value
    shown = shown or name
    raise ApiError(400, f"'{shown}' must be {_KINDS[kind]}, not {json.dumps(value)[:60]}.", param=shown)


def _messages(value: Any, *, extend: bool = False) -> list[Message]:
    """The `messages` of a chat request as `--messages` takes them: system, user and assistant turns (OpenAI's
    "developer" is a system turn), ending with a user turn; content as a string or a list of text parts."""
    if not isinstance(value, list) or not value:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects.", param="messages")
    messages = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise ApiError(400, f"messages[{i}] is not an object with a role and a content.", param="messages")
        role, content = item.get("role"), item.get("content")
        if isinstance(content, list):
            content = _text_parts(content, i)
        messages.append(Message("system" if role == "developer" else role, content))
    try:
        validate_messages(messages)
        if not extend:
            validate_for_generation(messages)
        elif messages[-1].role != "assistant" or not messages[-1].content:
            raise MistralError("With continue_final_message the last message must be the assistant's, to go on with.")
    except MistralError as e:
        raise ApiError(400, str(e), param="messages") from None
    return messages


def _text_parts(parts: list[Any], i: int) -> str:
    texts = []
    for part in parts:
        if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
            kind = part.get("type") if isinstance(part, dict) else None
            what = f'a content part of type "{kind}"' if isinstance(kind, str) else "a content part that is not text"
            raise ApiError(400, f"messages[{i}] has {what}; this model reads text only.", param="messages")
        texts.append(part["text"])
    return "\n".join(texts)


# Fields this server does not implement, with the values that leave them off (many clients send those).
_OFF: dict[str, tuple[Any, ...]] = {
    "presence_penalty": (0,),
    "frequency_penalty": (0,),
    "logit_bias": ({},),
    "tools": ([],),
    "functions": ([],),
}
_OFF_COMPLETION = {"suffix": ("",), "best_of": (1,)}  # in a chat request, unknown and ignored
_INSTEAD = {
    "presence_penalty": "; repeat_penalty (an extra field) penalizes repeated tokens instead",
    "frequency_penalty": "; repeat_penalty (an extra field) penalizes repeated tokens instead",
}


def _unsupported(body: dict[str, Any], *, chat: bool) -> None:
    for name, off in _OFF.items() if chat else {**_OFF, **_OFF_COMPLETION}.items():
        if body.get(name) is not None and body[name] not in off:
            raise ApiError(400, f"{name} is not supported by this server{_INSTEAD.get(name, '')}; leave it out.",
                           param=name, code="unsupported_parameter")  # fmt: skip


# ---------------------------------------------------------------------------------------------------- answers


class Answer:
    """The shapes of one request's answer: its id, creation time and model, for the whole body or each chunk."""

    def __init__(self, chat: bool, model: str) -> None:
        self.chat, self.model = chat, model
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def whole(
        self, text: str, finish: str, stop_reason: str | None, usage: dict[str, Any],
        logprobs: list[TokenLogprob | None] | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        choice: dict[str, Any] = {"index": 0}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choice.update(logprobs=self.logprobs(logprobs), finish_reason=FINISH[finish], stop_reason=stop_reason)
        return {**self._head(False), "choices": [choice], "usage": usage}

    def chunk(self, text: str | None = None, *, role: bool = False, finish: str | None = None,
              stop_reason: str | None = None, logprobs: list[TokenLogprob | None] | None = None) -> bytes:  # fmt: skip
        """One event of the stream: a piece of text, the opening role (chat), or the finish reason."""
        choice: dict[str, Any] = {"index": 0}
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text is not None:
                delta["content"] = text
            choice["delta"] = delta
        else:
            choice["text"] = text or ""
        choice.update(logprobs=self.logprobs(logprobs), finish_reason=FINISH[finish] if finish else None)
        if finish:
            choice["stop_reason"] = stop_reason
        return event({**self._head(True), "choices": [choice]})

    def logprobs(self, scored: list[TokenLogprob | None] | None) -> dict[str, Any] | None:
        """Log-probabilities in the endpoint's shape: a chat's `{"content": [...]}`, or the completions API's four
        parallel lists (where an echoed prompt's first token has null)."""
        if scored is None:
            return None
        if self.chat:
            return {"content": [t.to_dict() for t in scored if t is not None]}
        tokens, offsets, offset = [], [], 0
        for t in scored:
            text = "" if t is None else t.text.decode("utf-8", errors="replace")
            tokens.append(text)
            offsets.append(offset)
            offset += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": [None if t is None else t.logprob for t in scored],
            "top_logprobs": [
                None if t is None else {b.decode("utf-8", errors="replace"): lp for _, b, lp in t.top} for t in scored
            ],
            "text_offset": offsets,
        }

    def usage_chunk(self, usage: dict[str, Any]) -> bytes:
        """The last event before [DONE] with stream_options.include_usage: no choices, the usage."""
        return event({**self._head(True), "choices": [], "usage": usage})

    def _head(self, streamed: bool) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if streamed else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},  # what the key/value cache already held
    }


def stop_reason(tok: Tokenizer, tokens: list[int], finish: str, stops: list[str]) -> str | None:
    """The stop string that ended the text (vLLM's `stop_reason`), which the engine's Done does not name: the one
    that comes first in the text of the generated tokens."""
    if finish != "stop_sequence":
        return None
    text = tok.decode(tokens)
    found = [(text.find(s), k) for k, s in enumerate(stops) if s in text]
    return stops[min(found)[1]] if found else stops[0]


def event(data: dict[str, Any]) -> bytes:
    """One server-sent event."""
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n\n"
