"""Defaults for the model, hardware and generation options, and where each effective value came from.

Precedence: the command line, then `MISTRAL_*` environment variables, then the TOML config file (`$MISTRAL_CONFIG`,
else `config.toml` in the user's config folder), then the built-in defaults below. No torch here: `mistral info` and
shell completion stay instant.
"""

from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mistral_cli.errors import UsageError

CONFIG_ENV = "MISTRAL_CONFIG"
COMMAND_LINE = "command line"
DEFAULT = "default"


@dataclass(frozen=True)
class Spec:
    kind: type  # str, int, float or list (of str)
    default: Any
    choices: tuple[str, ...] = ()
    minimum: int | None = None  # only where no later check (the sampler's) names the setting's source


SPECS: dict[str, Spec] = {
    "model": Spec(str, "mistral-7b-instruct-v0.2"),
    "device": Spec(str, "auto", ("auto", "cpu", "cuda", "mps")),
    "dtype": Spec(str, "auto", ("auto", "bf16", "fp16", "fp32")),
    "quantize": Spec(str, "none", ("none", "int8", "int4")),
    "max_context": Spec(int, None, minimum=1),
    "threads": Spec(int, None, minimum=1),
    "max_tokens": Spec(int, None),
    "temperature": Spec(float, 0.7),
    "top_p": Spec(float, 1.0),
    "top_k": Spec(int, 0),
    "min_p": Spec(float, 0.0),
    "repeat_penalty": Spec(float, 1.0),
    "seed": Spec(int, None),
    "stop": Spec(list, ()),
}
DEFAULTS: dict[str, Any] = {name: spec.default for name, spec in SPECS.items()}
GENERATION = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repeat_penalty", "seed", "stop")

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

    def generation(self) -> dict[str, Any]:
        """The generation options, checked; a bad value names where it was set. Imports torch (via the sampler)."""
        from mistral_cli.sampling import GenerationOptions

        options = {name: self[name] for name in GENERATION}
        for name in GENERATION:
            try:
                GenerationOptions(**{name: options[name]})
            except UsageError as exc:
                source = self.values[name].source
                if source == COMMAND_LINE:
                    raise  # the message already names the option the user typed
                raise UsageError(f"{str(exc).rstrip('.')} (from {source}).") from None
        return options


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
        if name in command_line:
            values[name] = Setting(_plain(command_line[name]), COMMAND_LINE)
        elif raw_env:  # an empty variable counts as unset, as in click
            values[name] = Setting(_from_env(name, spec, raw_env), f"env {env_var(name)}")
        elif file_values is not None and name in file_values:
            values[name] = Setting(file_values[name], f"config file {path}")
        else:
            values[name] = Setting(_plain(spec.default), DEFAULT)
    return Settings(values, path, file_values is not None)


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
    for key, value in data.items():
        name = key.replace("-", "_")  # `max-tokens` like the option, or `max_tokens`
        if name not in SPECS:
            close = difflib.get_close_matches(name, SPECS, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(SPECS)}."
            raise UsageError(f"Unknown key '{key}' in the config file {path}; {hint}")
        values[name] = _check(SPECS[name], value, f"'{key}' in the config file {path}")
    return values


def _check(spec: Spec, value: Any, where: str) -> Any:
    """A TOML value of the right type for `spec`, or a UsageError naming `where`."""
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
    if spec.minimum is not None and value < spec.minimum:
        raise UsageError(f"{where} must be {spec.minimum} or more, not {value!r}.")
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
