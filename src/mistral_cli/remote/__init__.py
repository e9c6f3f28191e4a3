"""Models on an OpenAI-compatible server (`--server`): mistral serve, vLLM, llama.cpp's server, Ollama, a hosted API."""
