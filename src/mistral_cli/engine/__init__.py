"""Generation: a loaded model with its tokenizer and cache, the sampler, and the GPU's decode-step replays."""
