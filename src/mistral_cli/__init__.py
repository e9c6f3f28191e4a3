"""mistral-cli: run Mistral 7B v0.2 in a terminal."""

import os
import warnings

__version__ = "0.1.0"

# torch warns when it is imported without numpy, which mistral-cli neither needs nor installs (it never hands
# tensors to numpy): every command would print that warning on a plain `pipx install`.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)

# Tensors of 2 MiB and more (weights, the key/value cache, a prompt's blocks) on transparent huge pages: torch's
# CPU allocator madvises them when this is set before its first allocation, that is, before torch is imported. One
# page fault per 2 MiB instead of per 4 KiB: on the 2-core benchmark machine the 7B model loaded 1.2-2.1x faster
# (bf16, int8) and read prompts about 1.1x faster. THP_MEM_ALLOC_ENABLE=0 turns it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
