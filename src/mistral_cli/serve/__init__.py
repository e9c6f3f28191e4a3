"""`mistral serve`: one model behind an OpenAI-compatible HTTP API, on our engine; imported by that command only."""
