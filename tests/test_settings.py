"""Settings: command line, then MISTRAL_* variables, then the config file, then the defaults; `mistral info` says
where each value came from; a bad config is one sentence."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest

from inprocess import mistral
from mistral_cli.cli.settings import SPECS, config_path, env_var, read_config, resolve
from mistral_cli.errors import UsageError
from mistral_cli.options import GENERATION, GenerationOptions


@pytest.fixture
def config(tmp_path) -> Path:
    """An empty config file; tests write into it. Empty also keeps the user's own config out of the test."""
    path = tmp_path / "config.toml"
    path.write_text("", encoding="utf-8")
    return path


@pytest.fixture
def env(tmp_path, config) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "MISTRAL_"))}
    env.update(HF_HOME=str(tmp_path / "hf"), MISTRAL_HOME=str(tmp_path / "models"), HF_HUB_OFFLINE="1")
    env.update(MISTRAL_CONFIG=str(config))
    return env


def test_precedence_command_line_then_env_then_file_then_default(config):
    config.write_text('temperature = 0.5\ntop-k = 40\nstop = "###"\ndevice = "cpu"\n', encoding="utf-8")
    environ = {"MISTRAL_CONFIG": str(config), "MISTRAL_TEMPERATURE": "0.3", "MISTRAL_DEVICE": "cuda"}
    s = resolve({"device": "mps"}, environ)
    file = f"config file {config}"
    assert s.to_json()["device"] == {"value": "mps", "source": "command line"}
    assert s.to_json()["temperature"] == {"value": 0.3, "source": "env MISTRAL_TEMPERATURE"}
    assert s.to_json()["top_k"] == {"value": 40, "source": file}
    assert s.to_json()["stop"] == {"value": ["###"], "source": file}
    assert s.to_json()["top_p"] == {"value": 1.0, "source": "default"}
    assert s.to_json()["max_tokens"] == {"value": None, "source": "default"}
    generation = s.checked(GenerationOptions, **{name: s[name] for name in GENERATION})
    assert generation == GenerationOptions(temperature=0.3, top_k=40, stop=["###"])


def test_every_setting_from_the_environment(config):
    values = {"model": "org/name", "device": "cpu", "dtype": "fp16", "quantize": "int8", "max_context": "2048",
              "threads": "3", "max_tokens": "12", "temperature": "0", "top_p": "0.9", "top_k": "5", "min_p": "0.05",
              "repeat_penalty": "1.1", "seed": "7", "stop": "END"}  # fmt: skip
    assert set(values) == set(SPECS)
    s = resolve({}, {"MISTRAL_CONFIG": str(config), **{env_var(k): v for k, v in values.items()}})
    assert {k: s[k] for k in SPECS} == {"model": "org/name", "device": "cpu", "dtype": "fp16", "quantize": "int8",
                                        "max_context": 2048, "threads": 3, "max_tokens": 12, "temperature": 0.0, "top_p": 0.9,
                                        "top_k": 5, "min_p": 0.05, "repeat_penalty": 1.1, "seed": 7,
                                        "stop": ["END"]}  # fmt: skip
    assert all(s.values[k].source == f"env {env_var(k)}" for k in SPECS)
    assert resolve({}, {"MISTRAL_CONFIG": str(config), "MISTRAL_SEED": ""})["seed"] is None  # empty is unset


def test_the_default_file_is_in_the_user_config_folder(tmp_path, monkeypatch):
    assert config_path({}).name == "config.toml" and config_path({}).parent.name == "mistral-cli"
    if sys.platform.startswith("linux"):  # platformdirs follows XDG there
        monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
        (tmp_path / "mistral-cli").mkdir()
        (tmp_path / "mistral-cli" / "config.toml").write_text("top_k = 3\n", encoding="utf-8")
        environ = {"XDG_CONFIG_HOME": str(tmp_path)}
        assert resolve({}, environ).values["top_k"].source == f"config file {tmp_path / 'mistral-cli' / 'config.toml'}"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "empty"))
    assert resolve({}, {}).config_found is False  # no file is fine; a file the user named must exist
    pytest.raises(UsageError, resolve, {}, {"MISTRAL_CONFIG": str(tmp_path / "absent.toml")})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("temperature = ", "is not valid TOML"),
        ("temprature = 0.1", "Unknown key 'temprature' in the config file {path}; did you mean 'temperature'?"),
        ("[generation]\ntemperature = 0.1", "Unknown key 'generation' in the config file {path}; known keys: model"),
        ('temperature = "hot"', "'temperature' in the config file {path} must be a number, not 'hot'."),
        ("top_k = 1.5", "'top_k' in the config file {path} must be an integer, not 1.5."),
        ("seed = true", "'seed' in the config file {path} must be an integer, not True."),
        ('device = "gpu"', "'device' in the config file {path} must be one of auto, cpu, cuda, mps, not 'gpu'."),
        ("stop = [1]", "'stop' in the config file {path} must be a string or a list of strings, not [1]."),
        ("max-context = 0", "--max-context must be 1 or more, not 0 (from config file {path})."),
    ],
)
def test_a_bad_config_file_is_one_sentence_naming_file_and_key(env, config, text, message):
    config.write_text(text + "\n", encoding="utf-8")
    r = mistral(env, "info")
    assert r.returncode == 2
    assert r.stderr.startswith("mistral: error: ") and len(r.stderr.strip().splitlines()) == 1
    assert message.format(path=config) in r.stderr and str(config) in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("MISTRAL_TEMPERATURE", "hot", "MISTRAL_TEMPERATURE must be a number, not 'hot'."),
        ("MISTRAL_MAX_TOKENS", "1.5", "MISTRAL_MAX_TOKENS must be an integer, not '1.5'."),
        ("MISTRAL_MAX_CONTEXT", "-5", "--max-context must be 1 or more, not -5 (from env MISTRAL_MAX_CONTEXT)."),
        ("MISTRAL_QUANTIZE", "int2", "MISTRAL_QUANTIZE must be one of none, int8, int4, not 'int2'."),
        ("MISTRAL_CONFIG", "/nonexistent/mistral.toml", "MISTRAL_CONFIG points to /nonexistent/mistral.toml"),
    ],
)
def test_a_bad_environment_variable_is_one_sentence(env, variable, value, message):
    r = mistral({**env, variable: value}, "info")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith(f"mistral: error: {message}")


def test_an_out_of_range_value_names_where_it_was_set(config):
    def generation(s):
        return s.checked(GenerationOptions, **{name: s[name] for name in GENERATION})

    config.write_text("temperature = -1\n", encoding="utf-8")
    with pytest.raises(UsageError, match=rf"--temperature must be .* not -1.0 \(from config file {config}\)\."):
        generation(resolve({}, {"MISTRAL_CONFIG": str(config)}))
    with pytest.raises(UsageError, match=r"--top-p must be in \(0, 1\], not 2.0 \(from env MISTRAL_TOP_P\)\."):
        generation(resolve({}, {"MISTRAL_CONFIG": str(config), "MISTRAL_TOP_P": "2", "MISTRAL_TEMPERATURE": "0"}))
    with pytest.raises(UsageError, match=r"^--temperature must be 0 \(greedy\) or more, not -2.0\.$"):
        generation(resolve({"temperature": -2.0}, {"MISTRAL_CONFIG": str(config)}))


def test_info_shows_each_value_and_its_source(env, config, hf_model_dir):
    config.write_text('dtype = "fp16"\nmax-context = 512\ntemperature = 0.5\nrepeat_penalty = 1.2\n', encoding="utf-8")
    env.update(MISTRAL_TEMPERATURE="0.3", MISTRAL_DEVICE="cpu")
    r = mistral(env, "info", str(hf_model_dir), "--json", "--max-context", "256")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    s = d["settings"]
    file = f"config file {config}"
    assert s["temperature"] == {"value": 0.3, "source": "env MISTRAL_TEMPERATURE"}
    assert s["repeat_penalty"] == {"value": 1.2, "source": file}
    assert s["dtype"] == {"value": "fp16", "source": file}
    assert s["max_context"] == {"value": 256, "source": "command line"}
    assert s["device"] == {"value": "cpu", "source": "env MISTRAL_DEVICE"}
    assert s["top_k"] == {"value": 0, "source": "default"}
    assert s["model"] == {"value": str(hf_model_dir), "source": "command line"}
    assert set(s) == set(SPECS)
    # the values in effect are the ones info describes
    assert (d["memory"]["dtype"], d["memory"]["context"], d["device"]["name"]) == ("fp16", 256, "cpu")

    table = mistral(env, "info", str(hf_model_dir)).stdout
    assert "env MISTRAL_TEMPERATURE" in table and file in table and str(config) in table


def test_complete_uses_the_settings_and_the_command_line_wins(env, config, hf_model_dir):
    config.write_text(f'model = "{hf_model_dir}"\nmax_tokens = 3\ntemperature = 0\nseed = 1\n', encoding="utf-8")
    r = mistral({**env, "MISTRAL_TOP_K": "7"}, "complete", "Hello", "--json", "--max-tokens", "2")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["model"] == str(hf_model_dir)
    assert (d["options"]["max_tokens"], d["options"]["temperature"], d["options"]["top_k"]) == (2, 0.0, 7)
    assert d["usage"]["completion_tokens"] <= 2 and d["seed"] == 1


def test_the_readme_example_config_is_valid(tmp_path):
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    example = re.search(r"```toml\n(.*?)```", readme, re.S)
    assert example, "README.md has no ```toml example"
    path = tmp_path / "config.toml"
    path.write_text(example.group(1), encoding="utf-8")
    assert read_config(path) is not None and set(read_config(path)) == set(SPECS)
