"""mistral-cli: run Mistral 7B v0.2 in a terminal."""

import warnings

__version__ = "0.1.0"

# torch warns when it is imported without numpy, which mistral-cli neither needs nor installs (it never hands
# tensors to numpy): every command would print that warning on a plain `pipx install`.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)
