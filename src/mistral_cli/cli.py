"""The `mistral` command line. It owns all terminal I/O and imports torch only inside commands that need it."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from mistral_cli import __version__, shell_completion
from mistral_cli.errors import MistralError
from mistral_cli.settings import DEFAULTS, SPECS, Settings, resolve

T = TypeVar("T")

DEFAULT_MODEL = DEFAULTS["model"]
# Defaults shown by --help are the built-in ones; MISTRAL_* variables and the config file change them.
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


shell_completion.use_ours()


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"
    mps = "mps"


class DType(str, Enum):
    auto = "auto"
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


class Quantize(str, Enum):
    none = "none"
    int8 = "int8"
    int4 = "int4"


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
    version: Annotated[
        bool | None,
        typer.Option("--version", "-V", callback=_version, is_eager=True, help="Show the version and exit."),
    ] = None,
) -> None:
    pass


ModelOpt = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help="Alias, Hugging Face repo id or local folder. \\[env var: MISTRAL_MODEL]",
        show_default=True,
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
        help="Penalty for tokens already in the context (1 = off). \\[env var: MISTRAL_REPEAT_PENALTY]",
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
        help="Stop when this text appears (repeatable); it is not printed. \\[env var: MISTRAL_STOP, one text]",
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
        help="Context size in tokens \\[default: the model's, 32768 for v0.2]. \\[env var: MISTRAL_MAX_CONTEXT]",
        rich_help_panel="Hardware",
    ),
]
Threads = Annotated[
    int | None,
    typer.Option(
        "--threads",
        help="CPU threads for the model \\[default: one per core]; fewer leaves cores to other work. "
        "\\[env var: MISTRAL_THREADS]",
        rich_help_panel="Hardware",
    ),
]
Compile = Annotated[
    bool,
    typer.Option(
        "--compile", help="torch.compile the decode step (cuda; slow first token).", rich_help_panel="Hardware"
    ),
]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Timings and speeds on stderr.")]


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
    verbose: Verbose = False,
    instruct: Annotated[
        bool, typer.Option("--instruct", "-i", help="Wrap the prompt as a user turn of the instruct format.")
    ] = False,
    system: Annotated[
        str | None, typer.Option("--system", help="System prompt (with --instruct or --messages).")
    ] = None,
    messages: Annotated[
        Path | None,
        typer.Option(
            "--messages",
            help="A conversation as JSON: a list of {role, content}; the next assistant message is generated.",
        ),
    ] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print one JSON object with the text, finish reason, usage and timings.")
    ] = False,
    echo: Annotated[bool, typer.Option("--echo", help="Print the prompt before the completion.")] = False,
    truncate: Annotated[
        bool,
        typer.Option(
            "--truncate",
            help="If the prompt does not fit the context, drop its beginning (oldest messages with --messages) "
            "instead of failing.",
        ),
    ] = False,
) -> None:
    """Continue a prompt (argument or stdin) and print only the generated text: made for shell pipelines."""
    from mistral_cli.complete import run_complete

    # model, the generation and the hardware options reach run_complete through _generate's settings (ctx.params)
    _guard(
        _generate,
        ctx,
        run_complete,
        prompt=prompt,
        compile=compile,
        verbose=verbose,
        instruct=instruct,
        system=system,
        messages=messages,
        json_out=json_out,
        echo=echo,
        truncate=truncate,
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
    verbose: Verbose = False,
    system: Annotated[str | None, typer.Option("--system", help="System prompt for the conversation.")] = None,
    load: Annotated[Path | None, typer.Option("--load", help="Start from a conversation saved with /save.")] = None,
) -> None:
    """Talk with the model in an interactive session (type /help inside)."""
    from mistral_cli.repl import run_chat

    # model, the generation and the hardware options reach run_chat through _generate's settings (ctx.params)
    _guard(
        _generate,
        ctx,
        run_chat,
        compile=compile,
        verbose=verbose,
        system=system,
        load=load,
    )


@app.command()
def download(
    ctx: typer.Context,
    model: Annotated[
        str,
        typer.Argument(help="Alias or Hugging Face repo id (with --url: any folder name). \\[env var: MISTRAL_MODEL]"),
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
        str | None, typer.Option("--url", help="Download this tar archive instead (implies --source tar).")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show the files and bytes that would be fetched, fetch nothing.")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Download again even if the files are there.")] = False,
) -> None:
    """Download a model's weights and tokenizer; prints the local folder on success.

    Hub (the default): only what inference needs, into the Hugging Face cache (HF_HOME), shared with other tools.
    Tar (--source tar or --url): the vendor's archive, unpacked into $MISTRAL_HOME (default: your data folder); an
    archive without tokenizer.model gets the v1 tokenizer, from the Hugging Face cache, the mistral-common package or
    mistral-community/Mistral-7B-v0.2. Running the command again resumes an interrupted download.
    """
    from mistral_cli.download import run_download

    settings = _guard(_settings, ctx)
    _guard(
        run_download,
        model=settings["model"],
        revision=revision,
        token=token,
        source=source.value,
        url=url,
        dry_run=dry_run,
        force=force,
    )


@app.command()
def info(
    ctx: typer.Context,
    model: Annotated[
        str | None, typer.Argument(help="Alias, repo id or folder \\[default: list local models].")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object instead of a table.")] = False,
    device: DeviceOpt = DEFAULT_DEVICE,
    dtype: DTypeOpt = DEFAULT_DTYPE,
    quantize: QuantizeOpt = DEFAULT_QUANTIZE,
    max_context: MaxContext = DEFAULTS["max_context"],
) -> None:
    """Show a model's architecture, files and memory needs, or list the models on disk; with the settings in effect
    and where each comes from."""
    from mistral_cli.info import run_info

    settings = _guard(_settings, ctx)
    _guard(
        run_info,
        model=model,
        json_out=json_out,
        device=settings["device"],
        dtype=settings["dtype"],
        quantize=settings["quantize"],
        max_context=settings["max_context"],
        settings=settings,
    )


def _settings(ctx: typer.Context) -> Settings:
    """The effective settings: options typed on this command line win over MISTRAL_* variables and the config file."""
    typed = {name: value for name, value in ctx.params.items() if name in SPECS and _typed(ctx, name)}
    return resolve(typed)


def _typed(ctx: typer.Context, name: str) -> bool:
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "COMMANDLINE"  # by name: click or Typer's vendored copy


def _generate(ctx: typer.Context, run: Callable[..., None], /, *, compile: bool, **kwargs: object) -> None:
    """Run complete or chat with the model, generation and hardware options from the settings."""
    s = _settings(ctx)
    hardware = {name: s[name] for name in ("device", "dtype", "quantize", "max_context", "threads")}
    run(model=s["model"], options=s.generation(), engine_options={**hardware, "compile": compile}, **kwargs)


def _guard(fn: Callable[..., T], /, *args: object, **kwargs: object) -> T:
    """Expected failures become one sentence on stderr and a non-zero exit, never a traceback."""
    try:
        return fn(*args, **kwargs)
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
    except RuntimeError as exc:
        if type(exc).__name__ != "OutOfMemoryError":  # torch.cuda.OutOfMemoryError, named so torch is not imported
            raise
        _error("The GPU ran out of memory: try --quantize int8 or int4, a smaller --max-context, or --device cpu.")
        raise typer.Exit(1) from None


def _error(message: str) -> None:
    sys.stderr.write(f"mistral: error: {message}\n")
    sys.stderr.flush()


def _quiet_broken_pipe() -> None:
    # The reader went away (`| head`): point stdout at devnull so the interpreter's final flush stays silent.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def main() -> None:
    try:
        app()
    except BrokenPipeError:
        _quiet_broken_pipe()
        sys.exit(0)
