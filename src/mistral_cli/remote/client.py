"""A model served over the OpenAI API, behind what the chat and `complete` use of a local Engine.

`RemoteEngine` has the engine's `max_context`, `tokenizer`, `cached_prefix`, `reset` and `load_s`, and two streaming
generators that yield the engine's own `Chunk`s and one `Done` (engine/events.py): `chat` over messages
(POST /v1/chat/completions) and `complete` over raw text (POST /v1/completions). Text comes as the server sends it;
a server sends no token ids, so each Chunk's token is -1 and `Done` counts tokens from the usage the stream ends with
(asked for with stream_options.include_usage), or one per piece of text where a server gives none. Time to the first
piece is `prefill_s`, the rest `decode_s`. Asked for log-probabilities, `Done.logprobs` holds every scored token the
stream brought, and a Chunk its own where the piece came with exactly one.

The official `openai` client does the protocol: server-sent events, retries of 429/5xx answers and lost connections
(RETRIES, waiting as Retry-After asks), errors. It is imported at the first request, so the local path and `--help`
never load it. Every failure is one MistralError sentence that names the server, never the key.

The tokenizer is an estimate: one token per three bytes of UTF-8, rounded up (about right for English and code, one
per character for CJK). The chat fits its history into the context with it; the server has the final word on what fits.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from mistral_cli.errors import MistralError, UsageError
from mistral_cli.options import GenerationOptions
from mistral_cli.text.chat_format import Message

if TYPE_CHECKING:
    from mistral_cli.engine.events import Chunk, Done, TokenLogprob
    from mistral_cli.text.output_format import OutputFormat

DEFAULT_CONTEXT = 32768  # Mistral 7B v0.2's, when neither --max-context nor the server's model list says
RETRIES = 2  # of a request the server answered 429 or 5xx, or whose connection failed: 0.5 s, then 1 s apart
TIMEOUT_S = 600.0  # the longest wait for the next bytes: a long prompt on a busy CPU server takes minutes
CONNECT_S = 10.0


def api_url(url: str) -> str:
    """The API's base URL, ending in /v1: `http://host:8000`, `http://host:8000/` and `http://host:8000/v1` alike."""
    text = url.strip()
    shown = f", not {text!r}" if "@" not in text else ""  # what may be a password is not repeated
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 (a bad port raises here)
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"--server needs an http:// or https:// URL such as http://localhost:8000{shown}.")
    if parts.username or parts.password:
        raise UsageError("--server must not hold credentials: give the key with --api-key or MISTRAL_API_KEY.")
    if parts.query or parts.fragment:
        raise UsageError(f"--server takes the server's base URL, without a query or fragment{shown}.")
    path = parts.path.rstrip("/")
    return f"{parts.scheme}://{parts.netloc}{path if path.endswith('/v1') else path + '/v1'}"


class EstimateTokenizer:
    """Token counts without the server's tokenizer, for fitting a chat's history: one per three bytes of UTF-8."""

    bos_id, eos_id = 1, 2

    def encode(self, text: str) -> list[int]:
        return [0] * -(-len(text.encode("utf-8")) // 3)

    def decode(self, ids: Sequence[int]) -> str:
        return ""  # never needed: a server's replies come as text, with no ids to decode


class RemoteEngine:
    """A model on an OpenAI-compatible server at `url` (with or without /v1). `model` None: the first the server
    lists (`connect` asks); `max_context` None: the model's `max_model_len` where the list gives one (vLLM), else
    DEFAULT_CONTEXT."""

    load_s = 0.0  # nothing is loaded here

    def __init__(
        self, url: str, api_key: str | None, model: str | None = None, *, max_context: int | None = None,
        timeout: float = TIMEOUT_S,
    ) -> None:  # fmt: skip
        self.url = api_url(url)
        self.model = model
        self.max_context = max_context or DEFAULT_CONTEXT
        self.tokenizer = EstimateTokenizer()
        self._context_given = max_context is not None
        self._key = api_key or None
        self._timeout = timeout
        self._client: Any = None

    # ------------------------------------------------------------------------------------- what the chat uses

    def cached_prefix(self, prompt: list[int]) -> int:
        return len(prompt)  # the server's cache is its own: there is nothing to read here

    def reset(self) -> None:
        pass  # no state between requests

    def connect(self) -> RemoteEngine:
        """Ask for the server's models (one request): the model when none was named, and its context."""
        models = self.models()
        if self.model is None:
            if not models:
                raise MistralError(f"The server at {self.url} lists no models; name one with --model.")
            self.model = models[0]["id"]
        entry = next((m for m in models if m["id"] == self.model), {})
        size = entry.get("max_model_len")
        if not self._context_given and isinstance(size, int) and size > 0:
            self.max_context = size
        return self

    def models(self) -> list[dict[str, Any]]:
        """The entries of GET /v1/models as the server sent them, those with an "id"."""
        data = self._call(lambda api: api.get("/models", cast_to=object), "/models")
        entries = data.get("data") if isinstance(data, dict) else None
        if not isinstance(entries, list):
            page = isinstance(data, str) and data.lstrip().startswith("<")
            raise self._not_openai("/models", "a web page" if page else "something other than a list of models")
        return [e for e in entries if isinstance(e, dict) and isinstance(e.get("id"), str)]

    # ------------------------------------------------------------------------------------------- generation

    def chat(
        self,
        messages: Sequence[Message],
        options: GenerationOptions,
        *,
        system: str | None = None,
        output_format: OutputFormat | None = None,
        extend: bool = False,
        logprobs: int | None = None,
    ) -> Iterator[Chunk | Done]:
        """The next assistant message after `messages` (`system` first), streamed; with `extend`, more of the last
        message, an assistant's (vLLM's `continue_final_message`, which `mistral serve` reads too); `logprobs`: each
        token's log-probability and this many alternatives (OpenAI's `logprobs`, `top_logprobs`)."""
        wire = _wire(messages, system)
        more = {"extra_body": {"continue_final_message": True, "add_generation_prompt": False}} if extend else {}
        scored = {} if logprobs is None else {"logprobs": True, "top_logprobs": logprobs}

        def create(api: Any, body: dict[str, Any]) -> Any:
            if more:
                body = {**body, "extra_body": {**body.get("extra_body", {}), **more["extra_body"]}}
            return api.chat.completions.create(messages=wire, **body, **scored)

        return self._stream(
            "/chat/completions",
            create,
            lambda choice: getattr(getattr(choice, "delta", None), "content", None),
            options,
            output_format,
            _chat_scores if logprobs is not None else None,
        )

    def complete(
        self, text: str, options: GenerationOptions, *, output_format: OutputFormat | None = None,
        logprobs: int | None = None,
    ) -> Iterator[Chunk | Done]:  # fmt: skip
        """The continuation of raw `text`, streamed; `logprobs` as for `chat` (the completions API's `logprobs`)."""
        scored = {} if logprobs is None else {"logprobs": logprobs}
        return self._stream(
            "/completions",
            lambda api, body: api.completions.create(prompt=text, **body, **scored),
            lambda choice: getattr(choice, "text", None),
            options,
            output_format,
            _completion_scores if logprobs is not None else None,
        )

    def _stream(
        self, path: str, create: Callable[[Any, dict[str, Any]], Any], piece: Callable[[Any], Any],
        options: GenerationOptions, output_format: OutputFormat | None,
        scores: Callable[[Any], list[TokenLogprob]] | None = None,
    ) -> Iterator[Chunk | Done]:  # fmt: skip
        import openai

        from mistral_cli.engine.events import Chunk, Done

        t0 = time.perf_counter()
        body = self._body(options)
        _ask_format(body, output_format, chat=path.startswith("/chat"))
        try:
            stream = create(self._api(), body)
        except openai.NotFoundError as exc:
            raise self._not_found(exc, path) from None
        except openai.OpenAIError as exc:
            raise self._explain(exc, path) from None
        parts: list[str] = []
        scored: list[TokenLogprob] = []
        finish = stop_reason = usage = first = cut = None
        try:
            kind = stream.response.headers.get("content-type", "")
            if "event-stream" not in kind:
                raise self._not_openai(path, "a web page" if "html" in kind else kind or "no content type")
            for event in stream:
                usage = getattr(event, "usage", None) or usage
                for choice in getattr(event, "choices", None) or ():
                    text = piece(choice)
                    came = scores(getattr(choice, "logprobs", None)) if scores is not None else []
                    scored += came
                    if isinstance(text, str) and text:
                        first = first or time.perf_counter()
                        parts.append(text)
                        yield Chunk(text, -1, came[0] if len(came) == 1 else None)
                    if getattr(choice, "finish_reason", None):
                        finish, stop_reason = choice.finish_reason, getattr(choice, "stop_reason", None)
        except openai.APITimeoutError:
            cut = f"nothing came for {self._timeout:g} s"
        except openai.APIConnectionError as exc:
            cut = _cause(exc)
        except openai.OpenAIError as exc:  # an error event in the stream
            raise self._explain(exc, path) from None
        except ValueError:  # an event that is not JSON
            raise self._not_openai(path, "events that are not JSON") from None
        except Exception as exc:
            if not type(exc).__module__.startswith(("httpx", "httpcore")):  # openai 1.x lets these through
                raise
            cut = _cause(exc)
        finally:
            stream.close()  # on Ctrl-C too: the server sees the connection close and stops generating
        if cut is not None or finish is None:
            why = f" ({cut})" if cut else ""
            raise MistralError(f"The server at {self.url} cut the reply off before it was finished{why}.")
        end = time.perf_counter()
        first = first or end
        n = _count(usage, "completion_tokens", len(parts))
        prompt = _count(usage, "prompt_tokens", 0)
        cached = _count(getattr(usage, "prompt_tokens_details", None), "cached_tokens", 0)
        yield Done(
            text="".join(parts),
            tokens=[-1] * n,
            finish_reason=_finish(finish, stop_reason, options),
            prompt_tokens=prompt,
            prefilled_tokens=max(prompt - cached, 0),
            prefill_s=first - t0,
            decode_s=end - first,
            logprobs=scored if scores is not None else None,
        )

    def _body(self, options: GenerationOptions) -> dict[str, Any]:
        """The request's options. Ours that the OpenAI API lacks go as extra fields, only when set: vLLM and
        llama.cpp's server read top_k and min_p, and the repeat penalty under their two names."""
        body: dict[str, Any] = {
            "model": self.model,
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": options.temperature,
            "top_p": options.top_p,
        }
        if options.seed is not None:
            body["seed"] = options.seed
        if options.max_tokens is not None:
            body["max_tokens"] = options.max_tokens
        if options.stop:
            body["stop"] = list(options.stop)
        extra: dict[str, Any] = {}
        if options.top_k:
            extra["top_k"] = options.top_k
        if options.min_p:
            extra["min_p"] = options.min_p
        if options.repeat_penalty != 1.0:
            extra["repetition_penalty"] = extra["repeat_penalty"] = options.repeat_penalty
        if extra:
            body["extra_body"] = extra
        return body

    # ------------------------------------------------------------------------------------------ the client

    def _api(self) -> Any:
        if self._client is None:
            import openai

            with _without_openai_settings():
                self._client = openai.OpenAI(
                    base_url=self.url,
                    api_key=self._key or "none",  # the client insists on one; a server without keys ignores it
                    max_retries=RETRIES,
                    timeout=openai.Timeout(self._timeout, connect=min(CONNECT_S, self._timeout)),
                )
        return self._client

    def _call(self, request: Callable[[Any], Any], path: str) -> Any:
        import openai

        try:
            return request(self._api())
        except openai.OpenAIError as exc:
            raise self._explain(exc, path) from None

    # ------------------------------------------------------------------------------------------ failures

    def _explain(self, exc: Exception, path: str) -> MistralError:
        """One sentence for what the client raised."""
        import openai

        at = f"The server at {self.url}"
        if isinstance(exc, openai.APITimeoutError):
            return MistralError(f"{at} did not answer within {self._timeout:g} s.")
        if isinstance(exc, openai.APIConnectionError):
            return MistralError(
                f"Cannot reach the server at {self.url} ({_cause(exc)}); check the URL and that the server is running."
            )
        says = self._says(exc)
        if not isinstance(exc, openai.APIStatusError):
            return MistralError(f"{at} stopped with an error{': ' + says if says else ''}.")
        code = exc.status_code
        status = f"{code} {exc.response.reason_phrase}".strip()
        if "html" in exc.response.headers.get("content-type", ""):
            return self._not_openai(path, f"a web page ({status})")
        if code == 401 and self._key:
            return MistralError(f"{at} refused the API key ({status}): check --api-key or MISTRAL_API_KEY.")
        if code == 401:
            return MistralError(f"{at} wants an API key ({status}): give it with --api-key or MISTRAL_API_KEY.")
        reason = f": {says}" if says else ""
        if code in (429, 503):
            return MistralError(f"{at} is busy ({status}{reason}) and still was after {RETRIES} retries; try later.")
        if code == 404:
            return MistralError(f"{at} has no /v1{path} ({status}{reason}); is it an OpenAI-compatible server?")
        if code >= 500:
            return MistralError(f"{at} failed ({status}){reason}.")
        return MistralError(f"{at} refused the request ({status}){reason}.")

    def _not_found(self, exc: Exception, path: str) -> MistralError:
        """A 404 to a generation: most often the model is not one the server has, which its list then shows."""
        try:
            names = [m["id"] for m in self.models()]
        except MistralError:
            return self._explain(exc, path)
        if self.model in names:
            return self._explain(exc, path)
        served = ", ".join(names[:10]) + (", …" if len(names) > 10 else "") if names else "none"
        return MistralError(
            f"The server at {self.url} has no model {self.model!r} (it lists: {served}); pick one with --model."
        )

    def _not_openai(self, path: str, what: str) -> MistralError:
        return MistralError(
            f"The server at {self.url} answered /v1{path} with {what}, not the OpenAI API; check the URL."
        )

    def _says(self, exc: Exception) -> str:
        """The server's own message, on one line, shortened, the key blanked out if a server echoes it."""
        body = getattr(exc, "body", None)
        if isinstance(body, dict):
            body = body.get("message") or body.get("detail") or body.get("error") or ""
        text = body if isinstance(body, str) else str(body or "")
        text = " ".join(text.split()).rstrip(".")
        if self._key:
            text = text.replace(self._key, "***")
        return text if len(text) <= 300 else text[:300] + "…"


def _ask_format(body: dict[str, Any], fmt: OutputFormat | None, *, chat: bool) -> None:
    """Put an output format in a request: JSON and JSON schemas as OpenAI's `response_format` (a top-level field of
    chat requests; an extra one for completions, which vLLM and ours read), a regex or grammar as vLLM's
    `guided_regex` / `guided_grammar`, which `mistral serve` reads too."""
    if fmt is None:
        return
    extra = body.setdefault("extra_body", {})
    if fmt.kind in ("json", "json_schema"):
        value: dict[str, Any] = {"type": "json_object"}
        if fmt.kind == "json_schema":
            schema = json.loads(fmt.source)
            value = {"type": "json_schema", "json_schema": {"name": "output", "schema": schema, "strict": True}}
        if chat:
            body["response_format"] = value
        else:
            extra["response_format"] = value
    else:
        extra["guided_regex" if fmt.kind == "regex" else "guided_grammar"] = fmt.source


def _chat_scores(logprobs: Any) -> list[TokenLogprob]:
    """The tokens of a chat stream's `logprobs.content`; the token ids where the server adds them (`mistral serve`
    does, as `id`), else -1."""
    from mistral_cli.engine.events import TokenLogprob

    def one(entry: Any) -> tuple[int, bytes, float]:
        raw = getattr(entry, "bytes", None)
        text = bytes(raw) if isinstance(raw, list) else str(getattr(entry, "token", "")).encode("utf-8")
        token = getattr(entry, "id", None)
        return (token if isinstance(token, int) else -1), text, float(getattr(entry, "logprob", math.nan))

    out = []
    for entry in getattr(logprobs, "content", None) or ():
        token, text, logprob = one(entry)
        out.append(TokenLogprob(token, text, logprob, [one(a) for a in getattr(entry, "top_logprobs", None) or ()]))
    return out


def _completion_scores(logprobs: Any) -> list[TokenLogprob]:
    """The tokens of a completions stream's `logprobs` (four parallel lists: the API gives no ids nor bytes, so the
    ids are -1 and the bytes the token's text)."""
    from mistral_cli.engine.events import TokenLogprob

    tokens = getattr(logprobs, "tokens", None) or []
    values = getattr(logprobs, "token_logprobs", None) or []
    tops = getattr(logprobs, "top_logprobs", None) or []
    out = []
    for i, (token, logprob) in enumerate(zip(tokens, values, strict=False)):
        top = tops[i] if i < len(tops) and isinstance(tops[i], dict) else {}
        ranked = sorted(top.items(), key=lambda kv: -kv[1])
        alternatives = [(-1, str(k).encode("utf-8"), float(v)) for k, v in ranked]
        out.append(TokenLogprob(-1, str(token).encode("utf-8"), float(logprob), alternatives))
    return out


def _wire(messages: Sequence[Message], system: str | None) -> list[dict[str, str]]:
    """Messages as the server gets them: the system prompt first, and each run of one role joined as the instruct
    format joins it (strict chat templates, such as the one vLLM uses for Mistral, refuse two user messages in a row)."""
    full = [*([Message("system", system)] if system else []), *messages]
    return [
        {"role": role, "content": "\n\n".join(m.content for m in run if m.content)}
        for role, run in itertools.groupby(full, key=lambda m: m.role)
    ]


def _finish(reason: str, stop_reason: Any, options: GenerationOptions) -> str:
    """The server's finish reason in the engine's words."""
    if reason == "length" and options.max_tokens is None:
        return "context"  # nothing else limited the reply
    if reason == "stop" and isinstance(stop_reason, str):
        return "stop_sequence"  # vLLM names the stop string it met (and gives a token id for an end of sequence)
    return reason


def _count(usage: Any, name: str, default: int) -> int:
    value = getattr(usage, name, None)
    return value if isinstance(value, int) and value >= 0 else default


def _cause(exc: BaseException) -> str:
    """The innermost reason for a failed connection, such as "connection refused"."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    text = re.sub(r"^\[Errno -?\d+\]\s*", "", str(exc).strip()) or type(exc).__name__
    return text[:1].lower() + text[1:200]


@contextmanager
def _without_openai_settings() -> Iterator[None]:
    """The client reads OPENAI_* variables (organization, project, extra headers, base URL) as it is made: they are
    the user's settings for OpenAI, not to be sent to this server."""
    saved = {name: os.environ.pop(name) for name in list(os.environ) if name.startswith("OPENAI_")}
    try:
        yield
    finally:
        os.environ.update(saved)
