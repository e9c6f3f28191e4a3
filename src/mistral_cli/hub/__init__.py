"""Models on disk and on the Hugging Face Hub: which model a name means, where its files are, and downloads."""
