"""Text and tokens: the SentencePiece tokenizer, the v1 instruct (chat) format and a chat's history."""
