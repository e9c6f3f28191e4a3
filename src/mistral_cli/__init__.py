"""mistral-cli: run Mistral 7B v0.2 in a terminal."""

__version__ = "0.1.0"
