"""A real terminal for tests: a program in a detached tmux session of its own server."""

from __future__ import annotations

import re
import subprocess
import time
import uuid
from pathlib import Path


class Tmux:
    """A program in a detached tmux session of its own server: keys in, screen text out."""

    def __init__(self, command: str, env: dict[str, str], cwd: Path, height: int = 40) -> None:
        self.base = ["tmux", "-L", f"mistral-test-{uuid.uuid4().hex[:8]}", "-f", "/dev/null"]
        shell = f"{command}; echo EXIT=$?; sleep 60"
        subprocess.run([*self.base, "new-session", "-d", "-s", "t", "-x", "100", "-y", str(height), shell],
                       env=env, cwd=cwd, check=True)  # fmt: skip

    def keys(self, *keys: str) -> None:
        subprocess.run([*self.base, "send-keys", "-t", "t", *keys], check=True)

    def type(self, text: str) -> None:
        subprocess.run([*self.base, "send-keys", "-t", "t", "-l", text], check=True)

    def paste(self, text: str) -> None:
        subprocess.run([*self.base, "set-buffer", "-t", "t", text], check=True)
        subprocess.run([*self.base, "paste-buffer", "-p", "-t", "t"], check=True)  # -p: as a bracketed paste

    def screen(self) -> str:
        out = subprocess.run([*self.base, "capture-pane", "-p", "-J", "-S", "-", "-t", "t"], capture_output=True)
        return out.stdout.decode("utf-8", errors="replace")

    def wait(self, pattern: str, count: int = 1, timeout: float = 30) -> str:
        """Wait until `pattern` (a regex) shows `count` times; fail with the screen."""
        end = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if len(re.findall(pattern, screen)) >= count:
                return screen
            if time.monotonic() > end:
                raise AssertionError(f"{pattern!r} (x{count}) did not show up; the screen:\n{screen}")
            time.sleep(0.1)

    def close(self) -> None:
        subprocess.run([*self.base, "kill-server"], capture_output=True)
