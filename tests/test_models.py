"""Model resolution (folders, aliases, repo ids in the HF cache, tar folders) and weight headers, all from disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from hub_server import folder_files, put_in_hf_cache
from mistral_cli.errors import MistralError
from mistral_cli.hub.models import (
    ALIASES,
    ModelNotFound,
    describe_weights,
    hf_hub_cache,
    list_local_models,
    read_safetensors_header,
    resolve_model,
)
from tiny import TinySpec, random_state_dict, write_hf, write_native

INSTRUCT = "mistralai/Mistral-7B-Instruct-v0.2"


@pytest.fixture
def homes(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """An empty HF cache and an empty tar folder, read at call time by models.py."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("MISTRAL_HOME", str(tmp_path / "models"))
    monkeypatch.chdir(tmp_path)
    return tmp_path / "hf" / "hub", tmp_path / "models"


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory) -> Path:
    spec = TinySpec()
    return write_hf(
        tmp_path_factory.mktemp("sharded") / "m", spec, random_state_dict(spec), shards=3, dtype=torch.bfloat16
    )


def test_aliases_name_the_published_repos_and_archives():
    instruct, base = ALIASES["mistral-7b-instruct-v0.2"], ALIASES["mistral-7b-v0.2"]
    assert (instruct.repo_id, instruct.tar_name) == (INSTRUCT, "Mistral-7B-v0.2-Instruct.tar")
    assert instruct.tar_md5 == "fbae55bc038f12f010b4251326e73d39"
    assert instruct.tar_url == "https://models.mistralcdn.com/mistral-7b-v0-2/Mistral-7B-v0.2-Instruct.tar"
    assert (base.repo_id, base.tar_name, base.tar_md5) == (
        "mistral-community/Mistral-7B-v0.2",
        "mistral-7B-v0.2.tar",
        None,
    )


def test_local_folders_in_both_formats(homes, hf_model_dir, native_model_dir):
    hf = resolve_model(str(hf_model_dir))
    assert (hf.folder, hf.source, hf.format, hf.repo_id, hf.revision) == (hf_model_dir, "local", "hf", None, None)
    assert hf.weights == (hf_model_dir / "model.safetensors",)
    assert hf.config == hf_model_dir / "config.json" and hf.tokenizer == hf_model_dir / "tokenizer.model"
    native = resolve_model(str(native_model_dir))
    assert (native.format, native.weights) == ("native", (native_model_dir / "consolidated.safetensors",))


def test_a_folder_path_wins_over_a_name(homes, hf_model_dir):
    hub_cache, _ = homes
    Path("acme").mkdir()
    (Path("acme") / "tiny").symlink_to(hf_model_dir)
    put_in_hf_cache(hub_cache, "acme/tiny", folder_files(hf_model_dir))
    assert resolve_model("acme/tiny").source == "local"


def test_repo_id_and_alias_found_in_the_hf_cache_offline(homes, sharded_dir):
    hub_cache, _ = homes
    snapshot = put_in_hf_cache(hub_cache, INSTRUCT, folder_files(sharded_dir))
    for name in ("mistral-7b-instruct-v0.2", INSTRUCT):
        paths = resolve_model(name)
        assert (paths.folder, paths.source, paths.repo_id, paths.name) == (snapshot, "hub-cache", INSTRUCT, name)
        assert paths.revision == snapshot.name
        assert [p.name for p in paths.weights] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]


def test_an_incomplete_snapshot_is_skipped_for_a_complete_one(homes, sharded_dir):
    hub_cache, _ = homes
    complete = put_in_hf_cache(hub_cache, "acme/tiny", folder_files(sharded_dir), ref=None)
    partial = folder_files(sharded_dir)
    del partial["model-00002-of-00003.safetensors"]
    put_in_hf_cache(hub_cache, "acme/tiny", partial, ref="main")  # main points at an interrupted update
    assert resolve_model("acme/tiny").folder == complete


def test_a_partly_downloaded_model_says_how_to_finish(homes, sharded_dir):
    hub_cache, _ = homes
    put_in_hf_cache(hub_cache, INSTRUCT, {"config.json": (sharded_dir / "config.json").read_bytes()})
    with pytest.raises(ModelNotFound, match=r"only partly .* run `mistral download mistral-7b-instruct-v0.2`"):
        resolve_model("mistral-7b-instruct-v0.2")


def test_a_tar_download_is_found_by_alias_and_by_name(homes, native_model_dir):
    _, models = homes
    (models).mkdir()
    (models / "mistral-7b-v0.2").symlink_to(native_model_dir)
    (models / "my-model").symlink_to(native_model_dir)
    base = resolve_model("mistral-7b-v0.2")
    assert (base.source, base.repo_id, base.format) == ("tar", "mistral-community/Mistral-7B-v0.2", "native")
    assert resolve_model("my-model").source == "tar"


def test_a_model_not_on_disk_gives_the_exact_download_command(homes):
    with pytest.raises(ModelNotFound) as err:
        resolve_model("mistral-7b-instruct-v0.2")
    assert "run `mistral download mistral-7b-instruct-v0.2` to download it" in str(err.value)
    assert err.value.command == ["mistral", "download", "mistral-7b-instruct-v0.2"]
    with pytest.raises(ModelNotFound, match=r"`mistral download acme/other`"):
        resolve_model("acme/other")


def test_unknown_names_and_missing_folders(homes):
    with pytest.raises(MistralError, match="Unknown model 'gpt-5'"):
        resolve_model("gpt-5")
    with pytest.raises(MistralError, match="There is no folder ./nowhere"):
        resolve_model("./nowhere")


def test_folders_that_are_not_models(homes, tmp_path, hf_model_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MistralError, match="neither config.json nor params.json"):
        resolve_model(str(empty))
    no_tok = tmp_path / "no-tok"
    no_tok.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tok / name).symlink_to(hf_model_dir / name)
    with pytest.raises(MistralError, match="has no tokenizer.model"):
        resolve_model(str(no_tok))


def test_hf_cache_location_follows_huggingface_hub_precedence(monkeypatch, tmp_path):
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert hf_hub_cache() == tmp_path / ".cache" / "huggingface" / "hub"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hf_hub_cache() == tmp_path / "xdg" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hf_hub_cache() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert hf_hub_cache() == tmp_path / "cache"


def test_safetensors_headers_match_what_safetensors_reads(sharded_dir):
    total = 0
    for path in sorted(sharded_dir.glob("*.safetensors")):
        header = read_safetensors_header(path)
        with safe_open(str(path), framework="pt") as f:
            assert set(header) == set(f.keys())
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                tensor = f.get_tensor(name)
                meta = header[name]
                assert (meta.dtype, meta.shape) == ("BF16", tuple(tensor.shape))
                assert meta.nbytes == tensor.numel() * 2
                total += tensor.numel()
    files = describe_weights(sorted(sharded_dir.glob("*.safetensors")))
    assert sum(f.n_params for f in files) == total == sum(t.numel() for t in random_state_dict(TinySpec()).values())
    assert files[0].dtypes == {"BF16": files[0].n_params}


def test_truncated_and_foreign_files_are_reported(tmp_path, hf_model_dir):
    data = (hf_model_dir / "model.safetensors").read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(MistralError, match="is truncated"):
        read_safetensors_header(cut)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\xff" * 64)
    with pytest.raises(MistralError, match="not a safetensors file"):
        read_safetensors_header(junk)


def test_a_pth_checkpoint_is_described_by_its_size(tmp_path):
    spec = TinySpec()
    folder = write_native(tmp_path / "pth", spec, random_state_dict(spec), fmt="pth")
    (weights,) = describe_weights(resolve_model(str(folder)).weights)
    assert weights.tensors is None and weights.n_params is None
    assert weights.bytes == (folder / "consolidated.00.pth").stat().st_size


def test_local_models_lists_mistral_models_of_both_kinds(homes, sharded_dir, native_model_dir):
    hub_cache, models = homes
    snapshot = put_in_hf_cache(hub_cache, INSTRUCT, folder_files(sharded_dir))
    put_in_hf_cache(hub_cache, "acme/bert", {"config.json": json.dumps({"model_type": "bert"}).encode()})
    partial = folder_files(sharded_dir)
    del partial["model-00003-of-00003.safetensors"]
    put_in_hf_cache(hub_cache, "acme/half", partial)
    models.mkdir()
    (models / "mistral-7b-v0.2").symlink_to(native_model_dir)
    found = {m.name: m for m in list_local_models()}
    assert set(found) == {"mistral-7b-instruct-v0.2", "acme/half", "mistral-7b-v0.2"}
    instruct = found["mistral-7b-instruct-v0.2"]
    assert (instruct.folder, instruct.source, instruct.complete) == (snapshot, "hub-cache", True)
    assert instruct.bytes == sum(p.stat().st_size for p in sharded_dir.glob("*.safetensors"))
    assert not found["acme/half"].complete
    assert (found["mistral-7b-v0.2"].source, found["mistral-7b-v0.2"].complete) == ("tar", True)
