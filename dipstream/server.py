"""`dipstream serve`: an OpenAI-compatible HTTP server on the engine (work in progress)."""

from __future__ import annotations

from dataclasses import dataclass, field

from dipstream.api import SessionConfig


@dataclass
class ServeConfig(SessionConfig):
    """The server: where it listens, how many requests wait, and the engine it serves."""

    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on"})
    port: int = field(default=8080, metadata={"help": "TCP port (0: any free port, printed at start)"})
    max_queue: int = field(default=8, metadata={
        "help": "requests waiting for the engine beyond the one it runs; more get 503"})


def run_serve(cfg: ServeConfig) -> int:
    raise NotImplementedError
