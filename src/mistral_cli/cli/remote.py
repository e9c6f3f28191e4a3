"""`--server` on the command line: the server chat, complete and info use instead of a local model, checked once.

The model is the one `--model` (or MISTRAL_MODEL, or the config file) names; left at the default alias, it is the
first the server lists, since a server rarely calls its model by our alias. Options for the hardware of a local run
mean nothing for a server: from the environment or the config file they are ignored, typed next to --server they are
a usage error (a sign the user meant to run the model here). `--max-context` typed with --server is the budget the
chat fits its history into; from the environment or the file it is ignored like the rest (it was set for this
machine's memory): the server's own size counts then.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mistral_cli.errors import UsageError

if TYPE_CHECKING:
    import click

    from mistral_cli.remote.client import RemoteEngine

HARDWARE = ("device", "dtype", "quantize", "threads", "compile", "no_prepare")


def remote_engine(ctx: click.Context, server: str | None, api_key: str | None) -> RemoteEngine | None:
    """The server to use, or None to run the model here (no --server, or an empty one)."""
    if not server:
        if api_key and _source(ctx, "api_key") == "COMMANDLINE":
            raise UsageError("--api-key is the key of a --server; a model run here needs none.")
        return None
    from mistral_cli.remote.client import RemoteEngine

    from_env = _source(ctx, "server") == "ENVIRONMENT"
    for name in HARDWARE:
        if name in ctx.params and _source(ctx, name) == "COMMANDLINE":
            option = "--" + name.replace("_", "-")
            if from_env:
                raise UsageError(
                    f"{option} is for a model run on this machine, but MISTRAL_SERVER is set: leave {option} out, "
                    "or unset MISTRAL_SERVER to run the model here."
                )
            raise UsageError(f"{option} is for a model run on this machine, not with --server: leave one of them out.")
    model = ctx.params.get("model") if _source(ctx, "model") not in (None, "DEFAULT") else None
    typed_context = "max_context" in ctx.params and _source(ctx, "max_context") == "COMMANDLINE"
    return RemoteEngine(server, api_key, model, max_context=ctx.params["max_context"] if typed_context else None)


def _source(ctx: click.Context, name: str) -> str | None:
    source = ctx.get_parameter_source(name)
    return source.name if source is not None else None  # by name: Typer may run its own copy of click
