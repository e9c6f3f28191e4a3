"""The command line: the Typer app, its settings, and one module per command (complete, chat, info). Owns all
terminal I/O; imports torch only inside the commands that run the model."""
