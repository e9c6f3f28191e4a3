"""`mistral serve`: the model behind an OpenAI-compatible HTTP API (serve/), run by uvicorn on this machine's engine.

The port is taken before the model loads, so a port in use is one sentence at once rather than after the load; uvicorn
then serves on that socket (`--port 0` takes a free one, which the ready line shows). Ctrl-C or SIGTERM stops taking
requests, cancels those running or waiting (their clients get a 503 or an error event) and exits 0. Nothing of
FastAPI or uvicorn is imported before this command runs.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import sys
from typing import Any

from mistral_cli.errors import MistralError, UsageError
from mistral_cli.options import LoadOptions

GRACE_S = 5  # the longest a stopping server waits for its connections to close


def run_serve(
    *, model: str, host: str, port: int, api_key: str | None, waiting: int, loading: LoadOptions, verbose: bool
) -> None:
    try:
        import uvicorn

        from mistral_cli.serve.app import Api
    except ImportError as exc:  # both are dependencies; a broken install says which one is missing
        raise MistralError(f"mistral serve needs the {exc.name} package: pip install fastapi uvicorn.") from None
    if not api_key and not _loopback(host):
        _log(f"mistral: warning: serving on {host} without --api-key: anyone who can reach this machine can use it.")
    sock = _listen(host, port)
    try:
        engine, name = _load(model, loading, verbose)
        url = f"http://{_netloc(host, sock.getsockname()[1])}/v1"
        api = Api(engine, name, api_key=api_key, waiting=waiting, log=_log, verbose=verbose,
                  on_ready=lambda: _log(f"mistral: serving {name} on {url} (Ctrl-C stops)"))  # fmt: skip
        config = uvicorn.Config(
            api,
            lifespan="on",
            access_log=False,  # ours is one line per request, with its tokens (serve/app.py)
            log_config=uvicorn.config.LOGGING_CONFIG if verbose else None,
            log_level="info" if verbose else "error",
            timeout_graceful_shutdown=GRACE_S,
        )
        _server(config, api).run(sockets=[sock])
    finally:
        sock.close()


def _server(config: Any, api: Any) -> Any:
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            # Not uvicorn's own, which raises the signal again once the server has stopped: the exit status would be
            # the signal's rather than 0. A second Ctrl-C stops without waiting for the connections to close.
            self.force_exit = self.should_exit
            self.should_exit = True
            api.stop()

    return Server(config)


def _load(model: str, loading: LoadOptions, verbose: bool) -> tuple[Any, str]:
    """The engine, and the model's name in the API: as given, a folder by its own name."""
    from rich.console import Console

    from mistral_cli.cli import banner
    from mistral_cli.cli.loading import load
    from mistral_cli.hub.models import resolve_model

    paths = resolve_model(model)
    engine = load(paths, loading, Console(stderr=True, highlight=False))
    if verbose:
        _log(f"mistral: loaded {paths.folder} on {banner.hardware(engine)} in {engine.load_s:.2f} s "
             f"({engine.weights_note}); context {engine.max_context:,} tokens")  # fmt: skip
    return engine, paths.folder.name if paths.source == "local" else model


def _listen(host: str, port: int) -> socket.socket:
    """A socket listening on host:port, or one sentence saying why there cannot be one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        address = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)[0][4]
    except (socket.gaierror, UnicodeError):
        raise UsageError(f"--host {host!r} is not an address or a name this machine knows.") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart need not wait for old connections
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        where = _netloc(host, port)
        if exc.errno == errno.EADDRINUSE:
            raise MistralError(f"{where} is already in use: stop what listens there, or pick another --port.") from None
        if exc.errno == errno.EACCES:
            raise MistralError(
                f"Not allowed to listen on {where} (ports below 1024 need root); pick another --port."
            ) from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise MistralError(f"{host} is not an address of this machine; try 127.0.0.1 or 0.0.0.0.") from None
        raise MistralError(f"Cannot listen on {where}: {exc.strerror or exc}.") from None
    return sock


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may well reach beyond this machine


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _log(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
