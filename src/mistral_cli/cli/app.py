"""The `mistral` command line. It owns all terminal I/O and imports torch only inside commands that need it."""

from __future__ import annotations

import errno
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from mistral_cli import __version__
from mistral_cli.cli import completion, settings
from mistral_cli.errors import MistralError, UsageError
from mistral_cli.hardware import bad_switch
from mistral_cli.options import DEVICES, DTYPES, QUANTIZATIONS, GenerationOptions, LoadOptions

DEFAULTS = {name: spec.default for name, spec in settings.SPECS.items()}
DEFAULT_MODEL = DEFAULTS["model"]
SETTINGS_EPILOG = (
    "Defaults can be set in the config file or MISTRAL_* variables; `mistral info MODEL` shows the values in effect."
)

app = typer.Typer(
    name="mistral",
    help="Run Mistral 7B v0.2 in your terminal: chat, shell-pipeline completion, downloads.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)

# The choices of options.py as the enums Typer shows in --help.
Device = Enum("Device", [(name, name) for name in DEVICES], type=str)
DType = Enum("DType", [(name, name) for name in DTYPES], type=str)
Quantize = Enum("Quantize", [(name, name) for name in QUANTIZATIONS], type=str)

DEFAULT_DEVICE = Device(DEFAULTS["device"])
DEFAULT_DTYPE = DType(DEFAULTS["dtype"])
DEFAULT_QUANTIZE = Quantize(DEFAULTS["quantize"])


class Source(str, Enum):
    hub = "hub"
    tar = "tar"


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mistral-cli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    version: Annotated[
        bool | None,
        typer.Option("--version", "-V", callback=_version, is_eager=True, help="Show the version and exit."),
    ] = None,
) -> None:
    settings.attach(ctx)  # MISTRAL_* variables and the config file, as the defaults of the command that runs


def _model_names(incomplete: str) -> list[str]:
    """Tab completion of MODEL: the aliases and the models on disk (read from the folders alone: no torch)."""
    from mistral_cli.hub.models import model_names

    return [n for n in model_names() if n.startswith(incomplete)]


def _download_names(incomplete: str) -> list[str]:
    """Tab completion of what `mistral download` takes: the aliases and the repo ids already in the cache."""
    from mistral_cli.hub.models import model_names

    return [n for n in model_names(folders=False) if n.startswith(incomplete)]


ModelOpt = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help="Alias, Hugging Face repo id or local folder. \\[env var: MISTRAL_MODEL]",
        show_default=True,
        autocompletion=_model_names,
    ),
]
GEN = "Generation"
MaxTokens = Annotated[
    int | None,
    typer.Option(
        "--max-tokens",
        "-n",
        help="Most tokens to generate \\[default: until the end or the context is full]. \\[env var: MISTRAL_MAX_TOKENS]",
        rich_help_panel=GEN,
    ),
]
Temperature = Annotated[
    float,
    typer.Option(
        "--temperature",
        "-t",
        help="Sampling temperature; 0 is greedy. \\[env var: MISTRAL_TEMPERATURE]",
        rich_help_panel=GEN,
    ),
]
TopP = Annotated[
    float,
    typer.Option(
        "--top-p",
        help="Nucleus sampling: keep the smallest set of tokens whose probability adds up to P (1 = off). "
        "\\[env var: MISTRAL_TOP_P]",
        rich_help_panel=GEN,
    ),
]
TopK = Annotated[
    int,
    typer.Option(
        "--top-k", help="Keep only the K most likely tokens (0 = off). \\[env var: MISTRAL_TOP_K]", rich_help_panel=GEN
    ),
]
MinP = Annotated[
    float,
    typer.Option(
        "--min-p",
        help="Drop tokens less likely than P times the most likely one (0 = off). \\[env var: MISTRAL_MIN_P]",
        rich_help_panel=GEN,
    ),
]
RepeatPenalty = Annotated[
    float,
    typer.Option(
        "--repeat-penalty",
        help="Penalty for the tokens among the last 64 of the context (1 = off). \\[env var: MISTRAL_REPEAT_PENALTY]",
        rich_help_panel=GEN,
    ),
]
Seed = Annotated[
    int | None,
    typer.Option(
        "--seed",
        "-s",
        help="Random seed; the same seed and options give the same text \\[default: random, reported by --json]. "
        "\\[env var: MISTRAL_SEED]",
        rich_help_panel=GEN,
    ),
]
Stop = Annotated[
    list[str] | None,
    typer.Option(
        "--stop",
        help="Stop when this text appears (repeatable); it is not printed \\[default: none]. "
        "\\[env var: MISTRAL_STOP, one text]",
        rich_help_panel=GEN,
    ),
]
DeviceOpt = Annotated[
    Device,
    typer.Option(
        "--device",
        help="Where to run: auto picks cuda, then mps, then cpu. \\[env var: MISTRAL_DEVICE]",
        rich_help_panel="Hardware",
    ),
]
DTypeOpt = Annotated[
    DType,
    typer.Option(
        "--dtype",
        help="Compute dtype: auto is bf16 on cuda, fp16 on mps, bf16 on cpu (fp32 on CPUs without AVX2/NEON). "
        "\\[env var: MISTRAL_DTYPE]",
        rich_help_panel="Hardware",
    ),
]
QuantizeOpt = Annotated[
    Quantize,
    typer.Option(
        "--quantize",
        "-q",
        help="Weight-only quantization applied at load time. \\[env var: MISTRAL_QUANTIZE]",
        rich_help_panel="Hardware",
    ),
]
MaxContext = Annotated[
    int | None,
    typer.Option(
        "--max-context",
        "--ctx-size",
        "-c",
        help="Context size in tokens \\[default: the model's, 32768 for v0.2]. \\[env var: MISTRAL_MAX_CONTEXT]",
        rich_help_panel="Hardware",
    ),
]
Threads = Annotated[
    int | None,
    typer.Option(
        "--threads",
        help="CPU threads for the model \\[default: one per core, fewer while other programs keep the CPU busy]; "
        "a number set here stays fixed. \\[env var: MISTRAL_THREADS]",
        rich_help_panel="Hardware",
    ),
]
Compile = Annotated[
    bool,
    typer.Option(
        "--compile",
        help="torch.compile the decode step (cuda only; slow first token) \\[default: off].",
        rich_help_panel="Hardware",
    ),
]
NoPrepare = Annotated[
    bool,
    typer.Option(
        "--no-prepare",
        help="Read the checkpoint on every load instead of mapping prepared weights from the cache folder (for a "
        "read-only or full disk; MISTRAL_PREPARE=off does the same) \\[default: off].",
        rich_help_panel="Hardware",
    ),
]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Timings and speeds on stderr \\[default: off].")]
ServerOpt = Annotated[
    str | None,
    typer.Option(
        "--server",
        envvar="MISTRAL_SERVER",
        help="Use the model of an OpenAI-compatible server at this URL (with or without /v1) instead of loading one: "
        "mistral serve, vLLM, llama.cpp's server, Ollama \\[default: none].",
        rich_help_panel="Remote",
        show_default=False,
    ),
]
ApiKeyOpt = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        envvar="MISTRAL_API_KEY",
        help="Bearer key for the server (never printed) \\[default: none].",
        rich_help_panel="Remote",
        show_default=False,
    ),
]


@app.command(epilog=SETTINGS_EPILOG)
def complete(
    ctx: typer.Context,
    prompt: Annotated[str | None, typer.Argument(help="The prompt; all of stdin when absent or '-'.")] = None,
    model: ModelOpt = DEFAULT_MODEL,
    max_tokens: MaxTokens = DEFAULTS["max_tokens"],
    temperature: Temperature = DEFAULTS["temperature"],
    top_p: TopP = DEFAULTS["top_p"],
    top_k: TopK = DEFAULTS["top_k"],
    min_p: MinP = DEFAULTS["min_p"],
    repeat_penalty: RepeatPenalty = DEFAULTS["repeat_penalty"],
    seed: Seed = DEFAULTS["seed"],
    stop: Stop = None,
    device: DeviceOpt = DEFAULT_DEVICE,
    dtype: DTypeOpt = DEFAULT_DTYPE,
    quantize: QuantizeOpt = DEFAULT_QUANTIZE,
    max_context: MaxContext = DEFAULTS["max_context"],
    threads: Threads = DEFAULTS["threads"],
    compile: Compile = False,
    no_prepare: NoPrepare = False,
    verbose: Verbose = False,
    instruct: Annotated[
        bool,
        typer.Option(
            "--instruct", "-i", help="Wrap the prompt as a user turn of the instruct format \\[default: off]."
        ),
    ] = False,
    system: Annotated[
        str | None, typer.Option("--system", help="System prompt (with --instruct or --messages) \\[default: none].")
    ] = None,
    messages: Annotated[
        Path | None,
        typer.Option(
            "--messages",
            help="A conversation as JSON (a list of {role, content}; '-' reads stdin); the next assistant message is "
            "generated \\[default: none].",
        ),
    ] = None,
    json_out: Annotated[
        bool,
        typer.Option(
            "--json", help="Print one JSON object with the text, finish reason, usage and timings \\[default: off]."
        ),
    ] = False,
    echo: Annotated[
        bool, typer.Option("--echo", help="Print the prompt before the completion \\[default: off].")
    ] = False,
    truncate: Annotated[
        bool,
        typer.Option(
            "--truncate",
            help="If the prompt does not fit the context, drop its beginning (oldest messages with --messages) "
            "instead of failing \\[default: off].",
        ),
    ] = False,
    json_schema: Annotated[
        str | None,
        typer.Option(
            "--json-schema",
            help="Constrain the output to JSON valid against this schema (a file, or the schema itself) "
            "\\[default: none].",
            rich_help_panel="Output format",
            show_default=False,
        ),
    ] = None,
    output_format: Annotated[
        str | None,
        typer.Option(
            "--format",
            help="'json': constrain the output to one JSON object \\[default: none].",
            rich_help_panel="Output format",
            show_default=False,
        ),
    ] = None,
    regex: Annotated[
        str | None,
        typer.Option(
            "--regex",
            help="Constrain the output to match this regular expression \\[default: none].",
            rich_help_panel="Output format",
            show_default=False,
        ),
    ] = None,
    grammar: Annotated[
        Path | None,
        typer.Option(
            "--grammar",
            help="Constrain the output to this grammar (a Lark or GBNF file) \\[default: none].",
            rich_help_panel="Output format",
            show_default=False,
        ),
    ] = None,
    logprobs: Annotated[
        int | None,
        typer.Option(
            "--logprobs",
            min=0,
            max=20,
            help="With --json: each token's log-probability (from the model's raw distribution) and its N likeliest "
            "alternatives; with --echo, the prompt's tokens too \\[default: off].",
            rich_help_panel="Output format",
            show_default=False,
        ),
    ] = None,
    extend: Annotated[
        bool,
        typer.Option(
            "--continue",
            help="Extend the last message of --messages, the assistant's (cut by --max-tokens or Ctrl-C), in place "
            "instead of answering it \\[default: off].",
            show_default=False,
        ),
    ] = False,
    batch: Annotated[
        Path | None,
        typer.Option(
            "--batch",
            help="Run every line of a JSONL file ('-': stdin) with one model load; JSONL results on stdout "
            "\\[default: none].",
            rich_help_panel="Batch",
            show_default=False,
        ),
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option(
            "--resume",
            help="With --batch: append results to this file, skipping the ids it already holds \\[default: none].",
            rich_help_panel="Batch",
            show_default=False,
        ),
    ] = None,
    server: ServerOpt = None,
    api_key: ApiKeyOpt = None,
) -> None:
    """Continue a prompt (argument or stdin) and print only the generated text: made for shell pipelines."""
    from mistral_cli.cli.complete import run_complete
    from mistral_cli.cli.remote import remote_engine

    with _reported():
        generation, loading = _run_options(
            ctx,
            dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                 repeat_penalty=repeat_penalty, seed=seed, stop=stop or []),
            dict(device=device.value, dtype=dtype.value, quantize=quantize.value, max_context=max_context,
                 threads=threads, compile=compile, prepare=not no_prepare),
        )  # fmt: skip
        from mistral_cli.text.output_format import from_options

        fmt = from_options(json_schema, output_format, regex, grammar)
        if resume is not None and batch is None:
            raise UsageError("--resume goes with --batch.")
        if batch is not None:
            from mistral_cli.cli.batch import run_batch

            if prompt is not None or messages is not None or server:
                raise UsageError("--batch takes the prompts from its file: give no PROMPT, --messages or --server.")
            run_batch(source=batch, resume=resume, model=model, generation=generation, loading=loading,
                      verbose=verbose, instruct=instruct, system=system, output_format=fmt,
                      logprobs=logprobs)  # fmt: skip
            return
        remote = remote_engine(ctx, server, api_key)
        run_complete(
            prompt=prompt,
            model=model,
            generation=generation,
            loading=loading,
            verbose=verbose,
            instruct=instruct,
            system=system,
            messages=messages,
            json_out=json_out,
            echo=echo,
            truncate=truncate,
            remote=remote,
            output_format=fmt,
            logprobs=logprobs,
            extend=extend,
        )


@app.command(epilog=SETTINGS_EPILOG)
def chat(
    ctx: typer.Context,
    model: ModelOpt = DEFAULT_MODEL,
    max_tokens: MaxTokens = DEFAULTS["max_tokens"],
    temperature: Temperature = DEFAULTS["temperature"],
    top_p: TopP = DEFAULTS["top_p"],
    top_k: TopK = DEFAULTS["top_k"],
    min_p: MinP = DEFAULTS["min_p"],
    repeat_penalty: RepeatPenalty = DEFAULTS["repeat_penalty"],
    seed: Seed = DEFAULTS["seed"],
    stop: Stop = None,
    device: DeviceOpt = DEFAULT_DEVICE,
    dtype: DTypeOpt = DEFAULT_DTYPE,
    quantize: QuantizeOpt = DEFAULT_QUANTIZE,
    max_context: MaxContext = DEFAULTS["max_context"],
    threads: Threads = DEFAULTS["threads"],
    compile: Compile = False,
    no_prepare: NoPrepare = False,
    verbose: Verbose = False,
    system: Annotated[
        str | None, typer.Option("--system", help="System prompt for the conversation \\[default: none].")
    ] = None,
    load: Annotated[
        Path | None, typer.Option("--load", help="Start from a conversation saved with /save \\[default: none].")
    ] = None,
    server: ServerOpt = None,
    api_key: ApiKeyOpt = None,
) -> None:
    """Talk with the model in an interactive session (type /help inside)."""
    from mistral_cli.cli.chat import run_chat
    from mistral_cli.cli.remote import remote_engine

    with _reported():
        generation, loading = _run_options(
            ctx,
            dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                 repeat_penalty=repeat_penalty, seed=seed, stop=stop or []),
            dict(device=device.value, dtype=dtype.value, quantize=quantize.value, max_context=max_context,
                 threads=threads, compile=compile, prepare=not no_prepare),
        )  # fmt: skip
        remote = remote_engine(ctx, server, api_key)
        run_chat(
            model=model,
            generation=generation,
            loading=loading,
            verbose=verbose,
            system=system,
            load=load,
            remote=remote,
        )


@app.command()
def download(
    ctx: typer.Context,
    model: Annotated[
        str,
        typer.Argument(
            help="Alias or Hugging Face repo id (with --url: any folder name). \\[env var: MISTRAL_MODEL]",
            autocompletion=_download_names,
        ),
    ] = DEFAULT_MODEL,
    revision: Annotated[
        str | None, typer.Option("--revision", help="Branch, tag or commit on the Hub \\[default: main].")
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            "--token", help="Hugging Face token \\[default: $HF_TOKEN, then the saved login].", show_default=False
        ),
    ] = None,
    source: Annotated[
        Source, typer.Option("--source", help="hub: the Hugging Face Hub; tar: the vendor's archive.")
    ] = Source.hub,
    url: Annotated[
        str | None,
        typer.Option("--url", help="Download this tar archive instead (implies --source tar) \\[default: none]."),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run", help="Show the files and bytes that would be fetched, fetch nothing \\[default: off]."
        ),
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Download again even if the files are there \\[default: off].")
    ] = False,
) -> None:
    """Download the weights and tokenizer of a model; prints the local folder on success.

    Hub (the default): only what inference needs, into the Hugging Face cache (HF_HOME), shared with other tools.
    Tar (--source tar or --url): the vendor's archive, unpacked into $MISTRAL_HOME (default: your data folder); an
    archive without tokenizer.model gets the v1 tokenizer, from the Hugging Face cache, the mistral-common package or
    mistral-community/Mistral-7B-v0.2. Running the command again resumes an interrupted download.
    """
    from mistral_cli.hub.download import run_download

    with _reported():
        settings.of(ctx)  # a bad MISTRAL_* variable or config file is reported, as by every command
        run_download(
            model=model, revision=revision, token=token, source=source.value, url=url, dry_run=dry_run, force=force
        )


@app.command()
def info(
    ctx: typer.Context,
    model: Annotated[
        str | None,
        typer.Argument(help="Alias, repo id or folder \\[default: list local models].", autocompletion=_model_names),
    ] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="One JSON object instead of a table \\[default: off].")
    ] = False,
    device: DeviceOpt = DEFAULT_DEVICE,
    dtype: DTypeOpt = DEFAULT_DTYPE,
    quantize: QuantizeOpt = DEFAULT_QUANTIZE,
    max_context: MaxContext = DEFAULTS["max_context"],
    prune: Annotated[
        bool,
        typer.Option(
            "--prune", help="Remove the prepared weights (of MODEL, or all) from the cache folder \\[default: off]."
        ),
    ] = False,
    server: ServerOpt = None,
    api_key: ApiKeyOpt = None,
) -> None:
    """Show a model's architecture, files and memory needs, or list the models on disk; with the settings in effect
    and where each comes from; with --server, the models that server lists."""
    from mistral_cli.cli.info import run_info
    from mistral_cli.cli.remote import remote_engine

    with _reported():
        s = settings.of(ctx)
        loading = s.checked(LoadOptions, device=device.value, dtype=dtype.value, quantize=quantize.value,
                            max_context=max_context)  # fmt: skip
        remote = remote_engine(ctx, server, api_key)
        run_info(model=model, json_out=json_out, loading=loading, settings=s, prune=prune, remote=remote)


@app.command()
def rm(
    model: Annotated[
        str,
        typer.Argument(
            help="Alias, Hugging Face repo id, or a folder `mistral download` made.",
            autocompletion=_model_names,
            show_default=False,
        ),
    ],
    yes: Annotated[
        bool,
        typer.Option(
            "--yes", "-y", help="Remove without asking (needed when stdin is not a terminal) \\[default: off]."
        ),
    ] = False,
    revision: Annotated[
        str | None,
        typer.Option(
            "--revision",
            help="Only this revision of a Hugging Face cache entry (branch, tag or commit); the files other revisions "
            "use stay \\[default: every revision].",
        ),
    ] = None,
) -> None:
    """Remove a downloaded model (its Hugging Face cache entry, or the folder a tar download made) and its prepared
    weights; lists them and the space freed first."""
    from mistral_cli.cli.rm import run_rm

    with _reported():
        run_rm(model, yes=yes, revision=revision)


@app.command(epilog=SETTINGS_EPILOG)
def serve(
    ctx: typer.Context,
    model: Annotated[
        str,
        typer.Argument(
            help="Alias, Hugging Face repo id or local folder. \\[env var: MISTRAL_MODEL]", autocompletion=_model_names
        ),
    ] = DEFAULT_MODEL,
    host: Annotated[
        str, typer.Option("--host", help="Address to listen on; 0.0.0.0 is every interface.", rich_help_panel="Server")
    ] = "127.0.0.1",
    port: Annotated[
        int,
        typer.Option("--port", min=0, max=65535, help="Port to listen on (0: a free one).", rich_help_panel="Server"),
    ] = 8080,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            envvar="MISTRAL_API_KEY",
            help="Key every /v1 request must send as `Authorization: Bearer KEY` (never printed) \\[default: none, "
            "open to all who can connect].",
            rich_help_panel="Server",
            show_default=False,
        ),
    ] = None,
    queue: Annotated[
        int,
        typer.Option(
            "--queue",
            min=0,
            help="Requests that may wait behind the running one; more get a 503.",
            rich_help_panel="Server",
        ),
    ] = 16,
    device: DeviceOpt = DEFAULT_DEVICE,
    dtype: DTypeOpt = DEFAULT_DTYPE,
    quantize: QuantizeOpt = DEFAULT_QUANTIZE,
    max_context: MaxContext = DEFAULTS["max_context"],
    threads: Threads = DEFAULTS["threads"],
    compile: Compile = False,
    no_prepare: NoPrepare = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Speeds per request, uvicorn's log, tracebacks \\[default: off].")
    ] = False,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models), one
    request at a time."""
    from mistral_cli.cli.serve import run_serve

    with _reported():
        s = settings.of(ctx)
        loading = s.checked(LoadOptions, device=device.value, dtype=dtype.value, quantize=quantize.value,
                            max_context=max_context, threads=threads, compile=compile, prepare=not no_prepare)  # fmt: skip
        run_serve(model=model, host=host, port=port, api_key=api_key, waiting=queue, loading=loading, verbose=verbose)


def _run_options(
    ctx: typer.Context, generation: dict[str, Any], loading: dict[str, Any]
) -> tuple[GenerationOptions, LoadOptions]:
    """The options a command that runs the model was given, each completed from the environment and the config
    file where the command line left it at its default, and checked."""
    s = settings.of(ctx)
    return s.checked(GenerationOptions, **generation), s.checked(LoadOptions, **loading)


@contextmanager
def _reported() -> Iterator[None]:
    """Expected failures become one sentence on stderr and a non-zero exit, never a traceback."""
    try:
        yield
    except MistralError as exc:
        _error(str(exc))
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        _error("Interrupted.")
        raise typer.Exit(130) from None
    except BrokenPipeError:
        _quiet_broken_pipe()
        raise typer.Exit(0) from None
    except MemoryError:
        _error("Out of memory: try --quantize int8, a smaller --max-context, or --device cpu.")
        raise typer.Exit(1) from None
    except OSError as exc:  # what the system refused: a full disk, a permission, a device error
        _error(_os_error(exc))
        _quiet_broken_pipe()  # the output may be what failed: the final flush must not fail again
        raise typer.Exit(1) from None
    except RuntimeError as exc:
        if type(exc).__name__ != "OutOfMemoryError":  # torch.cuda.OutOfMemoryError, named so torch is not imported
            raise
        _error("The GPU ran out of memory: try --quantize int8 or int4, a smaller --max-context, or --device cpu.")
        raise typer.Exit(1) from None


def _os_error(exc: OSError) -> str:
    """One sentence for an error the system gave: what failed, on which file, and what to do where that is clear."""
    reason = exc.strerror or type(exc).__name__
    where = f" ({exc.filename})" if exc.filename else " (writing the output)" if exc.errno in _OUTPUT_ERRNOS else ""
    hint = {
        errno.ENOSPC: " Free some space and run it again.",
        errno.EACCES: " Check the permissions of that path, or point the command elsewhere.",
        errno.EROFS: " That file system is read-only: point the command elsewhere.",
    }.get(exc.errno or 0, "")
    return f"{reason}{where}.{hint}"


_OUTPUT_ERRNOS = (errno.ENOSPC, errno.EIO, errno.EFBIG, errno.EDQUOT)


def _error(message: str) -> None:
    if sys.stderr is None:
        return  # stderr closed: the exit status is all there is
    sys.stderr.write(f"mistral: error: {message}\n")
    sys.stderr.flush()


def _quiet_broken_pipe() -> None:
    # The reader went away (`| head`) or the output failed: point stdout at devnull so the interpreter's final flush
    # stays silent.
    if sys.stdout is None:
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def _crash_report(exc: BaseException) -> str:
    """Save the traceback of an unexpected error under the cache folder; the sentence that points to it."""
    import time
    import traceback

    from platformdirs import user_cache_path

    from mistral_cli import atomic

    argv = [("***" if i and sys.argv[i - 1] == "--api-key" else a) for i, a in enumerate(sys.argv)]  # never the key
    argv = [a.split("=", 1)[0] + "=***" if a.startswith("--api-key=") else a for a in argv]
    text = f"mistral-cli {__version__}, {' '.join(argv)}\n\n" + "".join(traceback.format_exception(exc))
    try:
        folder = user_cache_path("mistral-cli") / "crashes"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
        atomic.write_text(path, text)
        saved = f"the traceback is in {path}"
    except OSError:
        saved = "the traceback could not be saved; MISTRAL_DEBUG=1 prints it"
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    return (
        f"Internal error: {type(exc).__name__}{': ' + first if first else ''}. This is a bug in mistral-cli: "
        f"{saved}; please report it with that file."
    )


def main() -> None:
    """The `mistral` command: the process-wide settings first (before torch is imported), then the app."""
    # torch warns when it is imported without numpy, which mistral-cli neither needs nor installs (it never hands
    # tensors to numpy): every command would print that warning on a plain `pipx install`.
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)
    if sys.stdout is None:  # started with stdout closed (`>&-`): nothing could be printed, not even --help
        _error("Standard output is closed: give the command a terminal, a pipe or a file to write to.")
        sys.exit(1)
    huge_pages()
    completion.use_ours()
    if (problem := bad_switch()) and not any(k.startswith("_MISTRAL_COMPLETE") for k in os.environ):
        _error(problem)
        sys.exit(2)
    try:
        # not standalone: click's usage errors come back here to be one line, not Typer's boxed panel
        status = app(standalone_mode=False)
    except BrokenPipeError:
        _quiet_broken_pipe()
        sys.exit(0)
    except Exception as exc:
        if _usage_error(exc):
            sys.exit(exc.exit_code)  # type: ignore[attr-defined]
        if type(exc).__name__ == "Abort":  # Ctrl-C or Ctrl-D at one of click's own prompts
            _error("Interrupted.")
            sys.exit(130)
        # a bug: one sentence and the traceback in a file; --verbose prints it too, MISTRAL_DEBUG=1 only raises it
        if os.environ.get("MISTRAL_DEBUG", "") not in ("", "0"):
            raise
        if {"--verbose", "-v"} & set(sys.argv[1:]):
            import traceback

            traceback.print_exception(exc)
        _error(_crash_report(exc))
        sys.exit(1)
    sys.exit(status if isinstance(status, int) else 0)


def _usage_error(exc: Exception) -> bool:
    """A bad command line (click's UsageError, from click or Typer's copy of it): one line and a pointer to --help."""
    if not (hasattr(exc, "format_message") and hasattr(exc, "exit_code") and hasattr(exc, "ctx")):
        return False
    message = exc.format_message().strip().rstrip(".")
    if message:  # empty: no arguments at all, and the help is already on the screen
        command = exc.ctx.command_path if exc.ctx is not None else "mistral"
        _error(f"{message}; `{command} --help` lists the options.")
    return True


def huge_pages() -> None:
    """Tensors of 2 MiB and more (weights, the key/value cache, a prompt's blocks) on transparent huge pages: torch's
    CPU allocator madvises them when THP_MEM_ALLOC_ENABLE is set before its first allocation, that is, before torch is
    imported. One page fault per 2 MiB instead of per 4 KiB: on the 2-core benchmark machine the 7B model loaded
    1.2-2.1x faster (bf16, int8) and read prompts about 1.1x faster. A user's THP_MEM_ALLOC_ENABLE=0 turns it off."""
    value = os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    if value not in ("0", "1"):  # torch would print its own raw warning and ignore it
        sys.stderr.write(f"mistral: warning: THP_MEM_ALLOC_ENABLE must be 0 or 1, not {value!r}; using 1.\n")
        os.environ["THP_MEM_ALLOC_ENABLE"] = "1"
