"""An output format the generated text must follow (`--json-schema`, `--format json`, `--regex`, `--grammar`, chat's
`/set format`, a server request's `response_format`), read and checked before the model loads. No grammar engine
here: engine/grammar.py compiles a format into token masks.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mistral_cli.errors import UsageError
from mistral_cli.userfiles import read_bounded

MAX_FILE_BYTES = 1 << 20  # a schema or grammar file is read no further: far larger than any sensible one


@dataclass(frozen=True)
class OutputFormat:
    kind: str  # "json" (any JSON object) | "json_schema" | "regex" | "grammar" (Lark or GBNF)
    source: str  # the schema as JSON text, the regular expression, or the grammar's text
    origin: str  # where it came from, for messages: "--json-schema person.json"


ANY_JSON = OutputFormat("json", '{"type": "object"}', "--format json")


def from_options(
    json_schema: str | None, format: str | None, regex: str | None, grammar: Path | None
) -> OutputFormat | None:
    """The format the command line asks for, or None; UsageError with one sentence when it cannot be used."""
    given = [name for name, value in (("--json-schema", json_schema), ("--format", format), ("--regex", regex),
                                      ("--grammar", grammar)) if value is not None]  # fmt: skip
    if len(given) > 1:
        raise UsageError(f"Give one output format, not {' and '.join(given)}.")
    if format is not None:
        if format != "json":
            raise UsageError(f"--format takes 'json' (one JSON object), not {format!r}; see also --json-schema.")
        return ANY_JSON
    if json_schema is not None:
        return schema_format(json_schema)
    if regex is not None:
        try:
            re.compile(regex)
        except re.error as e:
            raise UsageError(f"--regex {regex!r} is not a regular expression: {e}.") from None
        return OutputFormat("regex", regex, f"--regex {regex}")
    if grammar is not None:
        return OutputFormat("grammar", read_text(grammar, "--grammar"), f"--grammar {grammar}")
    return None


def schema_format(value: str, option: str = "--json-schema") -> OutputFormat:
    """A JSON schema given as its text (starting with `{`) or as a file holding it."""
    if value.lstrip().startswith("{"):
        text, origin = value, f"the schema of {option}"
    else:
        text, origin = read_text(Path(value), option), f"{option} {value}"
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"{origin} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}.") from None
    except RecursionError:
        raise UsageError(f"{origin} is nested too deeply.") from None
    if not isinstance(schema, dict):
        raise UsageError(f"{origin} must be a JSON object (a schema), not {type(schema).__name__}.")
    return OutputFormat("json_schema", json.dumps(schema), origin)


def read_text(path: Path, option: str) -> str:
    data = read_bounded(path, f"{option} {path}", MAX_FILE_BYTES, "not a schema or grammar", UsageError)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UsageError(f"{option} {path} is not UTF-8 text (bad byte at offset {e.start}).") from None


def from_response_format(value: Any) -> OutputFormat | None:
    """OpenAI's `response_format`: {"type": "text"} (or none), {"type": "json_object"}, or {"type": "json_schema",
    "json_schema": {"name", "schema", "strict"}}; ValueError with one sentence for anything else."""
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise ValueError('response_format must be an object with a "type": "text", "json_object" or "json_schema".')
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return OutputFormat("json", ANY_JSON.source, "response_format json_object")
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if schema is None and isinstance(spec, dict):
            schema = {}  # OpenAI allows a missing schema: any JSON
        if not isinstance(schema, dict):
            raise ValueError('response_format json_schema needs "json_schema": {"name": ..., "schema": {...}}.')
        return OutputFormat("json_schema", json.dumps(schema), "response_format json_schema")
    raise ValueError(f'response_format type must be "text", "json_object" or "json_schema", not {kind!r}.')
