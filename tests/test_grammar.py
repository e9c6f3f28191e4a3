"""Constrained decoding on a random-weight model, where nothing but the constraint can make the output valid: every
generation, greedy and sampled over many seeds, must parse and validate against its schema (jsonschema), match its
regex, or follow its grammar; and the command line and the server refuse a bad format in one sentence."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from inprocess import mistral
from mistral_cli.engine.events import Done
from mistral_cli.engine.grammar import Grammar
from mistral_cli.engine.load import load_engine
from mistral_cli.errors import MistralError, UsageError
from mistral_cli.options import GenerationOptions, LoadOptions
from mistral_cli.text.output_format import OutputFormat, from_options, from_response_format

SEEDS = range(50)
MAX_TOKENS = 160  # every schema below is bounded well inside this

SCHEMAS = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "role": {"enum": ["admin", "user", "guest"]},
        },
        "required": ["name", "age", "role"],
        "additionalProperties": False,
    },
    "nested": {
        "type": "object",
        "properties": {
            "point": {
                "type": "object",
                "properties": {"x": {"type": "integer", "minimum": -10, "maximum": 10}, "ok": {"type": "boolean"}},
                "required": ["x", "ok"],
                "additionalProperties": False,
            },
            "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3},
        },
        "required": ["point", "tags"],
        "additionalProperties": False,
    },
    "pattern": {
        "type": "object",
        "properties": {
            "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
            "n": {"type": "integer", "minimum": 1, "maximum": 9},
        },
        "required": ["code", "n"],
        "additionalProperties": False,
    },  # fmt: skip
}


@pytest.fixture(scope="module")
def engine(hf_model_dir):
    return load_engine(hf_model_dir, LoadOptions(device="cpu", dtype="fp32", prepare=False))


@pytest.fixture(scope="module")
def prompt(engine):
    return [engine.tokenizer.bos_id, *engine.tokenizer.encode("Answer in JSON:")]


def _generate(engine, prompt, grammar, options) -> Done:
    events = list(engine.generate(prompt, options, constraint=grammar.matcher()))
    return events[-1]


def _prompt_for(tok, seed: int, sampled: bool, prompt: list[int]) -> list[int]:
    """Greedy decoding gives one text whatever the seed: there each seed has its own prompt."""
    return prompt if sampled else [tok.bos_id, *tok.encode(f"Answer number {seed}, in JSON:")]


def _options(seed: int, sampled: bool, max_tokens: int = MAX_TOKENS) -> GenerationOptions:
    return GenerationOptions(max_tokens=max_tokens, temperature=1.0 if sampled else 0.0, seed=seed)


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
@pytest.mark.parametrize("name", list(SCHEMAS))
def test_every_output_validates_against_its_schema(engine, prompt, name, sampled):
    schema = SCHEMAS[name]
    grammar = Grammar(engine.tokenizer, OutputFormat("json_schema", json.dumps(schema), name))
    texts = set()
    for seed in SEEDS:
        ids = _prompt_for(engine.tokenizer, seed, sampled, prompt)
        done = _generate(engine, ids, grammar, _options(seed, sampled))
        assert done.finish_reason == "stop" and done.grammar_complete, (seed, done.text)
        jsonschema.validate(json.loads(done.text), schema)
        texts.add(done.text)
    assert len(texts) > 1  # the seeds made different texts: the model chose, the grammar only masked


def test_without_a_mask_the_random_model_writes_no_json(engine, prompt):
    done = list(engine.generate(prompt, _options(0, True, 40)))[-1]
    with pytest.raises(json.JSONDecodeError):
        json.loads(done.text)


def test_any_json_object(engine, prompt):
    # On a random model an unbounded object rarely closes (a key goes on until the budget): every text opens an
    # object, and is either a whole one (finish "stop") or said to be incomplete (finish "length").
    grammar = Grammar(engine.tokenizer, from_options(None, "json", None, None))
    for seed in range(10):
        done = _generate(engine, prompt, grammar, _options(seed, True, 40))
        assert done.text.startswith("{")
        if done.finish_reason == "length":
            assert done.grammar_complete is False
            with pytest.raises(json.JSONDecodeError):
                json.loads(done.text)
        else:
            assert isinstance(json.loads(done.text), dict)


def test_a_regex(engine, prompt):
    grammar = Grammar(engine.tokenizer, from_options(None, None, r"(yes|no), [0-9]{1,3} (cats|dogs)\.", None))
    for seed in range(20):
        done = _generate(engine, prompt, grammar, _options(seed, True))
        assert re.fullmatch(r"(yes|no), [0-9]{1,3} (cats|dogs)\.", done.text), done.text


@pytest.mark.parametrize(
    "text",
    [
        'start: expr\nexpr: NUMBER | "(" expr OP expr ")"\nOP: "+" | "*"\nNUMBER: /[1-9]/\n',  # Lark
        'root ::= expr\nexpr ::= num | "(" expr op expr ")"\nop ::= "+" | "*"\nnum ::= [1-9]\n',  # GBNF
    ],
    ids=["lark", "gbnf"],
)
def test_a_grammar_file(engine, prompt, tmp_path, text):
    path = tmp_path / "arith.g"
    path.write_text(text)
    grammar = Grammar(engine.tokenizer, from_options(None, None, None, path))
    shape = re.compile(r"[1-9]|\(.*\)")
    finished = 0
    for seed in range(20):
        done = _generate(engine, prompt, grammar, _options(seed, True, 60))
        if done.finish_reason == "length":
            continue  # nesting can go deeper than the budget
        finished += 1
        assert shape.fullmatch(done.text) and done.text.count("(") == done.text.count(")"), done.text
        assert eval(done.text) > 0  # noqa: S307 (digits, brackets, + and * only: checked above)
    assert finished > 0


def test_running_out_of_tokens_is_length_and_incomplete(engine, prompt):
    grammar = Grammar(engine.tokenizer, OutputFormat("json_schema", json.dumps(SCHEMAS["person"]), "person"))
    done = _generate(engine, prompt, grammar, _options(0, True, 3))
    assert done.finish_reason == "length" and done.grammar_complete is False


def test_formats_from_the_command_line_and_requests(tmp_path):
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps(SCHEMAS["person"]))
    assert from_options(str(schema), None, None, None).kind == "json_schema"
    assert json.loads(from_options('{"type": "integer"}', None, None, None).source) == {"type": "integer"}
    for args, needle in [
        ((str(tmp_path / "none.json"), None, None, None), "does not exist"),
        (("{not json", None, None, None), "is not valid JSON"),
        (("[1]", None, None, None), "does not exist"),  # not an object, and no such file
        ((None, "yaml", None, None), "--format takes 'json'"),
        ((None, None, "(", None), "is not a regular expression"),
        ((None, "json", "a", None), "Give one output format"),
        ((None, None, None, tmp_path), "is a folder"),
    ]:
        with pytest.raises(UsageError, match=re.escape(needle)):
            from_options(*args)
    assert from_response_format({"type": "text"}) is None
    assert from_response_format({"type": "json_object"}).kind == "json"
    assert (
        from_response_format({"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}).kind == "json_schema"
    )
    with pytest.raises(ValueError, match="must be"):
        from_response_format({"type": "xml"})


def test_a_schema_the_engine_cannot_use_is_one_sentence(engine):
    with pytest.raises(MistralError, match=r"^bad cannot be used: "):
        Grammar(engine.tokenizer, OutputFormat("json_schema", '{"type": "no-such-type"}', "bad"))
    with pytest.raises(MistralError, match=r"^g cannot be used: "):
        Grammar(engine.tokenizer, OutputFormat("grammar", "start: undefined_rule\n", "g"))


def test_complete_json_schema_end_to_end(hf_model_dir, tmp_path):
    schema = tmp_path / "person.json"
    schema.write_text(json.dumps(SCHEMAS["person"]))
    env = {"PATH": "/usr/bin:/bin", "MISTRAL_PREPARE": "off"}
    r = mistral(env, "complete", "-m", str(hf_model_dir), "--dtype", "fp32", "-n", "100", "--seed", "4",
                "--json-schema", str(schema), "Give me a person.")  # fmt: skip
    assert r.returncode == 0, r.stderr
    jsonschema.validate(json.loads(r.stdout), SCHEMAS["person"])
    r = mistral(env, "complete", "-m", str(hf_model_dir), "--dtype", "fp32", "-n", "2", "--json-schema", str(schema),
                "Give me a person.")  # fmt: skip
    assert r.returncode == 0 and "before the format of --json-schema" in r.stderr and "may not parse" in r.stderr
    r = mistral(env, "complete", "-m", str(hf_model_dir), "--format", "xml", "Hi")
    assert r.returncode == 2 and "--format takes 'json'" in r.stderr
