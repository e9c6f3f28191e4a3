"""Where each option's value comes from: the command line, then `MISTRAL_*` environment variables, then the TOML
config file (`$MISTRAL_CONFIG`, else `config.toml` in the user's config folder), then the built-in defaults (those of
`options.py` and `hub/models.py`).

The root command reads the environment and the file once (`attach`) and hands their values to click as the commands'
`default_map`: each command then receives its options already resolved, by name, and click tells where a value came
from (`ctx.get_parameter_source`); `Settings` says which variable or file that was. A bad variable or file is a
`UsageError` naming it, raised when a command runs (so `--help` still works). No torch here: `mistral info` and shell
completion stay instant.
"""

from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from mistral_cli.errors import UsageError
from mistral_cli.hub.models import DEFAULT_MODEL
from mistral_cli.options import (
    DEVICES,
    DTYPES,
    GENERATION,
    LOADING,
    QUANTIZATIONS,
    GenerationOptions,
    LoadOptions,
    OptionError,
)

if TYPE_CHECKING:
    import click

T = TypeVar("T")
CONFIG_ENV = "MISTRAL_CONFIG"
COMMAND_LINE = "command line"
DEFAULT = "default"


@dataclass(frozen=True)
class Spec:
    kind: type  # str, int, float or list (of str)
    default: Any
    choices: tuple[str, ...] = ()


_G, _L = GenerationOptions(), LoadOptions()
SPECS: dict[str, Spec] = {
    "model": Spec(str, DEFAULT_MODEL),
    "device": Spec(str, _L.device, DEVICES),
    "dtype": Spec(str, _L.dtype, DTYPES),
    "quantize": Spec(str, _L.quantize, QUANTIZATIONS),
    "max_context": Spec(int, _L.max_context),
    "threads": Spec(int, _L.threads),
    "max_tokens": Spec(int, _G.max_tokens),
    "temperature": Spec(float, _G.temperature),
    "top_p": Spec(float, _G.top_p),
    "top_k": Spec(int, _G.top_k),
    "min_p": Spec(float, _G.min_p),
    "repeat_penalty": Spec(float, _G.repeat_penalty),
    "seed": Spec(int, _G.seed),
    "stop": Spec(list, tuple(_G.stop)),
}
assert set(SPECS) == {"model", *LOADING, *GENERATION}
# The settings each command takes from the environment and the file (`info MODEL` names its model itself: with no
# argument it lists the models on disk).
COMMANDS: dict[str, tuple[str, ...]] = {
    "complete": tuple(SPECS),
    "chat": tuple(SPECS),
    "download": ("model",),
    "info": ("device", "dtype", "quantize", "max_context"),
    "serve": ("model", "device", "dtype", "quantize", "max_context", "threads"),  # a request brings its own sampling
}

_KIND_NAMES = {str: "a string", int: "an integer", float: "a number", list: "a string or a list of strings"}


def env_var(name: str) -> str:
    return f"MISTRAL_{name.upper()}"


@dataclass(frozen=True)
class Setting:
    value: Any
    source: str  # "default" | "config file <path>" | "env MISTRAL_X" | "command line"


@dataclass(frozen=True)
class Settings:
    values: dict[str, Setting]
    config_path: Path
    config_found: bool = False

    def __getitem__(self, name: str) -> Any:
        return self.values[name].value

    def to_json(self) -> dict[str, dict[str, Any]]:
        return {name: {"value": s.value, "source": s.source} for name, s in self.values.items()}

    def typed(self, command_line: Mapping[str, Any]) -> Settings:
        """These settings with the values typed on the command line in front."""
        typed = {name: Setting(_plain(value), COMMAND_LINE) for name, value in command_line.items() if name in SPECS}
        return Settings({**self.values, **typed}, self.config_path, self.config_found)

    def checked(self, build: Callable[..., T], /, **values: Any) -> T:
        """`build(**values)` (an options class), a value out of range reported with where it was set."""
        try:
            return build(**values)
        except OptionError as exc:
            source = self.values[exc.option].source
            if source in (COMMAND_LINE, DEFAULT):
                raise  # the message already names the option the user typed
            raise UsageError(f"{str(exc).rstrip('.')} (from {source}).") from None


def config_path(environ: Mapping[str, str] | None = None) -> Path:
    environ = os.environ if environ is None else environ
    if environ.get(CONFIG_ENV):
        return Path(environ[CONFIG_ENV]).expanduser()
    from platformdirs import user_config_dir

    return Path(user_config_dir("mistral-cli", appauthor=False)) / "config.toml"


def resolve(command_line: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Settings:
    """Each setting from the first of: `command_line` (what the user typed), the environment, the config file, the
    built-in default."""
    environ = os.environ if environ is None else environ
    path = config_path(environ)
    file_values = read_config(path, required=bool(environ.get(CONFIG_ENV)))
    values: dict[str, Setting] = {}
    for name, spec in SPECS.items():
        raw_env = environ.get(env_var(name))
        if raw_env:  # an empty variable counts as unset, as in click
            values[name] = Setting(_from_env(name, spec, raw_env), f"env {env_var(name)}")
        elif file_values is not None and name in file_values:
            values[name] = Setting(file_values[name], f"config file {path}")
        else:
            values[name] = Setting(_plain(spec.default), DEFAULT)
    return Settings(values, path, file_values is not None).typed(command_line)


# ------------------------------------------------------------------------------------------------- with click


def attach(ctx: click.Context) -> None:
    """Read the environment and the config file for the command about to run, and hand their values to click as its
    defaults. An error is kept for `of` to raise, so that `--help` works with a broken config file."""
    try:
        settings = resolve({})
    except UsageError as exc:
        ctx.obj = exc
        return
    ctx.obj = settings
    ctx.default_map = {
        command: {name: settings[name] for name in names if settings.values[name].source != DEFAULT}
        for command, names in COMMANDS.items()
    }


def of(ctx: click.Context) -> Settings:
    """The settings in effect for a running command: what `attach` read, and the options typed on its command line."""
    found = ctx.find_root().obj
    if isinstance(found, UsageError):
        raise found
    assert isinstance(found, Settings), "the root command attaches the settings"
    return found.typed({name: value for name, value in ctx.params.items() if _typed(ctx, name)})


def _typed(ctx: click.Context, name: str) -> bool:
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "COMMANDLINE"  # by name: Typer may run its own copy of click


# ---------------------------------------------------------------------------------------------------- the file


def read_config(path: Path, *, required: bool = False) -> dict[str, Any] | None:
    """The settings in a TOML file, checked; None when there is no file (an error if the user named it)."""
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        if required:
            raise UsageError(f"{CONFIG_ENV} points to {path}, which does not exist.") from None
        return None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "it is not UTF-8 text"
        raise UsageError(f"Cannot read the config file {path}: {reason}.") from None
    if sys.version_info >= (3, 11):
        import tomllib  # here, not at the top: shell completion imports this module and never reads the file
    else:
        import tomli as tomllib
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"The config file {path} is not valid TOML: {exc}.") from None
    values: dict[str, Any] = {}
    keys: dict[str, str] = {}
    for key, value in data.items():
        name = key.replace("-", "_")  # `max-tokens` like the option, or `max_tokens`
        if name not in SPECS:
            close = difflib.get_close_matches(name, SPECS, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(SPECS)}."
            raise UsageError(f"Unknown key '{key}' in the config file {path}; {hint}")
        if name in keys:
            raise UsageError(f"The config file {path} sets {name} twice, as '{keys[name]}' and '{key}'; keep one.")
        keys[name] = key
        values[name] = _check(SPECS[name], value, f"'{key}' in the config file {path}")
    return values


def _check(spec: Spec, value: Any, where: str) -> Any:
    """A TOML value of the right type for `spec`, or a UsageError naming `where`. Ranges are the options' own check
    (options.py)."""
    ok = {
        str: isinstance(value, str),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        list: isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value)),
    }[spec.kind]
    if not ok:
        raise UsageError(f"{where} must be {_KIND_NAMES[spec.kind]}, not {value!r}.")
    if spec.choices and value not in spec.choices:
        raise UsageError(f"{where} must be one of {', '.join(spec.choices)}, not {value!r}.")
    if spec.kind is float:
        return float(value)
    if spec.kind is list:
        return [value] if isinstance(value, str) else list(value)
    return value


def _from_env(name: str, spec: Spec, raw: str) -> Any:
    where = env_var(name)
    if spec.kind is list:
        return [raw]  # one stop text; several go in the config file
    if spec.kind in (int, float):
        try:
            return _check(spec, spec.kind(raw), where)
        except ValueError:
            raise UsageError(f"{where} must be {_KIND_NAMES[spec.kind]}, not {raw!r}.") from None
    return _check(spec, raw, where)


def _plain(value: Any) -> Any:
    """Enums become their string, tuples lists: what JSON and the commands expect."""
    if isinstance(value, (list, tuple)):
        return list(value)
    return getattr(value, "value", value)
