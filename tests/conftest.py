import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

# The cache folder (our kernels' library, prepared weights, crash reports) is the session's own, in-process and in
# every command the tests run: a test never reads or fills the user's.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="mistral-test-cache-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], True)

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))  # bench.py, for its smoke test

from tiny import TinySpec, random_state_dict, write_hf, write_native  # noqa: E402


@pytest.fixture(scope="session")
def tiny_spec() -> TinySpec:
    return TinySpec()


@pytest.fixture(scope="session")
def tiny_sd(tiny_spec):
    return random_state_dict(tiny_spec, seed=0)


@pytest.fixture(scope="session")
def hf_model_dir(tmp_path_factory, tiny_spec, tiny_sd) -> Path:
    """A tiny HF-format model folder (config.json + model.safetensors + tokenizer.model), shared by the session."""
    return write_hf(tmp_path_factory.mktemp("hf") / "tiny-hf", tiny_spec, tiny_sd)


@pytest.fixture(scope="session")
def native_model_dir(tmp_path_factory, tiny_spec, tiny_sd) -> Path:
    """The same weights as a native folder (params.json + consolidated.safetensors + tokenizer.model)."""
    return write_native(tmp_path_factory.mktemp("native") / "tiny-native", tiny_spec, tiny_sd)
