"""One chat session apart from its input: the engine, the conversation, the generation options, and the turns that
stream replies into a view; errors in one turn are reported and the session goes on.

The engine is a local Engine or a server's RemoteEngine (remote/client.py): both yield Chunks and a Done. They differ
in one place, `_generate`: the local engine reads the prompt's token ids, so that its cache keeps what it can; a server
reads the messages those ids encode, and the conversation's token counts are an estimate (shown with "~")."""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markdown import Markdown

from mistral_cli.cli.chat import commands
from mistral_cli.cli.chat.views import MarkdownView, PlainView
from mistral_cli.errors import MistralError
from mistral_cli.options import GenerationOptions, LoadOptions
from mistral_cli.remote.client import RemoteEngine
from mistral_cli.text.conversation import CUT_REASONS, Conversation, Prompt, reply_room

if TYPE_CHECKING:
    from mistral_cli.engine.engine import Engine
    from mistral_cli.text.output_format import OutputFormat


def kilo(n: int) -> str:
    """1229 -> "1.2k", 32768 -> "32k": context sizes are powers of two, so k is 1024."""
    if n < 1000:
        return str(n)
    return f"{n / 1024:.1f}".removesuffix(".0") + "k"


class Session:
    """One session: an engine, a conversation, options, and what the user sees of them."""

    def __init__(
        self,
        engine: Engine | RemoteEngine,
        conversation: Conversation,
        options: GenerationOptions,
        *,
        model: str,
        out: Console,
        notes: Console,
        markdown: bool,
        verbose: bool = False,
        folder: Path | None = None,
        loading: LoadOptions | None = None,
    ) -> None:
        self.engine, self.conv, self.opts = engine, conversation, options
        self.loading = loading  # how /model loads another model
        self.format: OutputFormat | None = None  # /set format, /set schema
        self._grammar: Any = None  # self.format compiled for the engine's tokenizer, made at the first reply
        self.remote = isinstance(engine, RemoteEngine)
        self.model, self.folder = model, folder
        self.out, self.notes = out, notes  # command output; incidental notes (stderr when not interactive)
        self.markdown, self.verbose = markdown, verbose
        self.failures = 0
        self.last_speed: float | None = None  # decode tokens/s of the last reply
        self.last_done: Any = None
        self.last_seed: int | None = None

    # --------------------------------------------------------------------------------------------- input lines

    def handle(self, line: str) -> bool:
        """Act on one input (a message or a slash command); errors are reported here. False means: leave."""
        text = line.strip()
        if not text:
            return True
        try:
            if text.startswith("/") and not text.startswith("//"):
                return commands.run(self, text)
            self.send(text[1:] if text.startswith("//") else text)
        except MistralError as e:
            self.error(str(e))
        except KeyboardInterrupt:
            self.note("Interrupted.")
        except BrokenPipeError:
            raise  # the reader of stdout went away: the session is over
        except Exception as e:  # a bug or an out-of-memory in one turn must not end the session
            self.engine.reset()  # the cache may be half-written; the next turn prefills from scratch
            if isinstance(e, MemoryError) or "out of memory" in str(e).lower():
                self.error("Out of memory: /clear the conversation, or start with a smaller --max-context.")
            else:
                self.error(f"Internal error: {type(e).__name__}: {e}")
            if self.verbose:
                self.notes.print(traceback.format_exc(), markup=False, highlight=False)
        return True

    def note(self, text: str, style: str = "dim") -> None:
        self.notes.print(text, style=style, markup=False, highlight=False)

    def error(self, text: str) -> None:
        self.failures += 1
        self.notes.print(f"error: {text}", style="bold red", markup=False, highlight=False)

    def status_line(self) -> str:
        used = min(self.conv.tokens_used(), self.engine.max_context)  # a reply that filled it counts 2 more
        about = "~" if self.remote else ""
        parts = [self.model, f"{about}{kilo(used)}/{kilo(self.engine.max_context)} tokens"]
        if self.last_speed is not None:
            parts.append(f"{self.last_speed:.1f} tok/s")
        return " · ".join(parts)

    # ---------------------------------------------------------------------------------------------------- turns

    def send(self, text: str) -> None:
        self.reply(self.conv.ask(text, self.engine.max_context, self.room()))

    def room(self) -> int:
        return reply_room(self.opts.max_tokens, self.engine.max_context)

    def set_format(self, fmt: OutputFormat | None) -> None:
        if fmt is not None and not self.remote:
            from mistral_cli.engine.grammar import Grammar

            self._grammar = Grammar(self.engine.tokenizer, fmt)  # a bad schema is refused now, not at the next reply
        else:
            self._grammar = None
        self.format = fmt

    def reply(self, prompt: Prompt, *, extend: bool = False) -> None:
        """Generate the reply to the last message, streaming it; Ctrl-C keeps what came so far, marked as cut.
        `extend`: go on with the last reply instead (`prompt` from Conversation.extend)."""
        from mistral_cli.engine.events import Done

        if prompt.dropped:
            n = len(prompt.dropped)
            self.note(
                f"The context is full: dropped the oldest {commands.count(n, 'exchange')} "
                f"({prompt.dropped_tokens} tokens) to make room; /save still writes them.",
                style="yellow",
            )
        opts = self.opts.with_seed()  # a random seed per turn unless one is set, so /retry gives a new reply
        self.last_seed = opts.seed
        new = len(prompt.ids) - self.engine.cached_prefix(prompt.ids)
        waiting = f"reading {new:,} tokens…" if new > 256 else "thinking…"
        # JSON under /set format is shown as it is: Markdown would eat its backslashes, `*` and `_`
        view: PlainView | MarkdownView = PlainView(self.notes)
        if self.markdown:
            view = MarkdownView(self.out, waiting, plain=self.format is not None,
                                reading=getattr(self.engine, "reading", None))  # fmt: skip
        parts: list[str] = []
        sampled: list[int] = []
        finish, started, done = "interrupted", None, None
        events = self._generate(prompt, opts, extend)
        try:
            for event in events:
                if isinstance(event, Done):
                    done = self.last_done = event
                    finish = event.finish_reason
                    continue
                if started is None:
                    started = time.perf_counter()
                if event.token >= 0:
                    sampled.append(event.token)
                if event.text:
                    parts.append(event.text)
                    view.add(event.text)
        except KeyboardInterrupt:
            finish = "interrupted"
        except BaseException:
            finish = "error"
            raise
        finally:
            events.close()
            if finish in ("error", "interrupted") and not sampled and not parts and extend:
                view.end(None)
                self.conv.answer_more("", self.conv.exchanges[-1].finish or "interrupted")
            elif finish in ("error", "interrupted") and not sampled and not parts:
                view.end(None)
                # Stopped before the first token (while reading the prompt): as if the message had not been sent,
                # so the next one is a turn of its own. The prompt's history (up arrow) still has it.
                self.conv.undo()
                if finish == "interrupted":
                    self.note("Interrupted before the reply began; the message was not sent.")
            else:
                view.end(CUT_REASONS.get(finish))
                (self.conv.answer_more if extend else self.conv.answer)("".join(parts), finish, sampled)
            if started is not None and len(sampled) > 1:  # the first token comes from the prefill, not a decode step
                self.last_speed = (len(sampled) - 1) / (time.perf_counter() - started)
            elif done is not None and done.completion_tokens > 1:  # a server sends no ids: its own count
                self.last_speed = done.decode_tokens_per_s
        if self.verbose and self.remote and done is not None:
            self.note(
                f"prompt {done.prompt_tokens} tokens, first token after {done.prefill_s:.2f} s; "
                f"{done.completion_tokens} tokens in {done.decode_s:.2f} s ({done.decode_tokens_per_s:.1f} tokens/s); "
                f"finish: {done.finish_reason}"
            )
        elif self.verbose and finish not in ("interrupted", "error"):
            d = self.last_done
            self.note(
                f"prompt {d.prompt_tokens} tokens, {d.prefilled_tokens} new, read in {d.prefill_s:.2f} s "
                f"({d.prefill_tokens_per_s:.1f} tokens/s); {d.completion_tokens} tokens in {d.decode_s:.2f} s "
                f"({d.decode_tokens_per_s:.1f} tokens/s); finish: {d.finish_reason}"
            )

    def _generate(self, prompt: Prompt, opts: GenerationOptions, extend: bool = False) -> Iterator[Any]:
        if isinstance(self.engine, RemoteEngine):
            return self.engine.chat(self.conv.messages(), opts, system=self.conv.system, output_format=self.format,
                                    extend=extend)  # fmt: skip
        # a continued reply follows text: its first space is a real one
        return self.engine.generate(prompt.ids, opts, leading_space=extend, constraint=self._constraint(extend))

    def _constraint(self, extend: bool) -> Any:
        """A matcher of the format for this reply; a continued reply's text so far is fed to it first."""
        if self._grammar is None:
            return None
        matcher = self._grammar.matcher()
        if extend:
            last = self.conv.exchanges[-1]
            for token in last.reply_ids or self.conv.tok.encode(last.reply or ""):
                matcher.accept(token)
        return matcher

    def switch(self, name: str) -> None:
        """/model: the conversation goes on with another model, read again into its cache at the next reply."""
        if isinstance(self.engine, RemoteEngine):
            served = [m["id"] for m in self.engine.models()]
            if name not in served:
                raise MistralError(
                    f"The server at {self.engine.url} has no model {name!r}; it lists: {', '.join(served)}."
                )
            self.engine.model = self.model = name
            self.note(f"Now talking to {name} on {self.engine.url}.")
            return
        from mistral_cli.cli.loading import load
        from mistral_cli.hub.models import resolve_model

        paths = resolve_model(name)
        engine = load(paths, self.loading or LoadOptions(), self.notes)
        if engine.tokenizer.vocab_size != self.engine.tokenizer.vocab_size:
            for ex in self.conv.exchanges:
                ex.reply_ids = None  # ids of another vocabulary: the replies' text is encoded again
        self.engine = engine  # the old model's memory goes with the last reference to it
        self.conv.tok = type(self.conv.tok)(engine.tokenizer)
        self.model = paths.folder.name if paths.source == "local" else paths.name
        self.folder = paths.folder
        if self.format is not None:
            self.set_format(self.format)
        self.note(f"Now using {self.model} ({engine.weights_note}, {engine.load_s:.1f} s); the conversation "
                  f"({self.conv.tokens_used()} tokens) is read again at the next reply.")  # fmt: skip

    def load(self, path: Path, system: str | None = None) -> None:
        """Continue the conversation in `path`; `system`, when given, replaces the file's system prompt."""
        self.conv.load(path)
        if system is not None:
            self.conv.system = system or None
        n = len(self.conv.exchanges)
        shown = f"; system prompt {self.conv.system[:60]!r}" if self.conv.system else ""
        self.note(f"Loaded {commands.count(n, 'exchange')} from {path} ({self.conv.tokens_used()} tokens{shown}).")
        if n:
            last = self.conv.exchanges[-1]
            self.note(f"> {last.user}")
            if last.reply is None:
                self.note("It ends with your message: /retry answers it.")
            elif self.markdown and not _structured(last.reply):
                self.out.print(Markdown(last.reply))
                self.out.print()
            else:
                self.note(last.reply, style="")


def _structured(reply: str) -> bool:
    """Whether a reply is a JSON object or array (one made under /set format or /set schema): shown as it is, as it
    was when it streamed, since Markdown would eat its backslashes, `*` and `_`."""
    try:
        return isinstance(json.loads(reply), (dict, list))
    except ValueError:
        return False
