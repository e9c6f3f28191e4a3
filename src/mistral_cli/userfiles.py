"""Reading a file the user named (a batch, a conversation, a schema or grammar): never more than a limit, so a FIFO
or /dev/zero is not read forever, and one sentence for each way it can fail."""

from __future__ import annotations

from pathlib import Path

from mistral_cli.errors import MistralError


def read_bounded(path: Path, what: str, limit: int, too_big: str, error: type[MistralError] = MistralError) -> bytes:
    """The bytes of `path`, at most `limit`. `what` names the file in a failure ("Batch file in.jsonl"), `too_big`
    ends the sentence for a larger one ("split it"); `error` is raised, with MistralError's exit status for a file
    that exists but cannot be read."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        raise error(f"{what} does not exist.") from None
    except IsADirectoryError:
        raise error(f"{what} is a folder, not a file.") from None
    except OSError as e:
        raise MistralError(f"{what} cannot be read: {e.strerror or e}.") from None
    if len(data) > limit:
        size = f"{limit >> 30} GiB" if limit >= 1 << 30 else f"{limit >> 20} MiB"
        raise error(f"{what} is over {size}: {too_big}.")
    return data
