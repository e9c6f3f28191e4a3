"""The `mistral` command run in this process with Typer's test runner: for tests of what a command prints and its
exit status, where a real process (pipes, signals, start-up time) is not what is tested. Much faster than a
subprocess: no interpreter start and no imports per call."""

from __future__ import annotations

import os
import subprocess

from typer.testing import CliRunner

from mistral_cli.cli.app import app


def mistral(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """Like `subprocess.run(["mistral", *args], env=env, capture_output=True, text=True)`: `env` is the whole
    environment of the run (variables of this process that it lacks are unset for the call)."""
    overrides: dict[str, str | None] = {k: None for k in os.environ if k not in env}
    overrides.update(env)
    result = CliRunner().invoke(app, list(args), env=overrides, prog_name="mistral")
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return subprocess.CompletedProcess(["mistral", *args], result.exit_code, result.stdout, result.stderr)
