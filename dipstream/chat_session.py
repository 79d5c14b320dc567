"""`dipstream chat`: talk to a model in the terminal. The conversation goes through the model's chat
template; the oldest turns are dropped when it would no longer leave room for an answer in the
context; each answer streams as it is made, followed by its speed and what it read. Ctrl-C stops
an answer (what was said is kept), not the session; Ctrl-D, /exit or SIGTERM end it."""

from __future__ import annotations

import signal
import sys
from dataclasses import dataclass, field

from dipstream.api import SessionConfig, open_engine
from dipstream.engine.chat import chat_template
from dipstream.errors import DipstreamError

HELP = "/reset forgets the conversation, /stats shows the engine, /exit (or Ctrl-D) ends; Ctrl-C stops an answer"


@dataclass
class ChatConfig(SessionConfig):
    """An interactive conversation with one model on the engine."""

    system: str | None = field(default=None, metadata={
        "help": "a system message that opens the conversation (where the model's template takes one)"})


class _Quit(Exception):
    """SIGTERM: the session ends (Ctrl-C only stops an answer)."""


def fit_history(engine, messages: list[dict], answer_room: int) -> list[dict]:
    """`messages` without the oldest exchanges (a system message is kept) until the rendered chat
    leaves `answer_room` tokens of the context; a last message that alone does not fit is refused."""
    head = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(head):]
    while turns:
        if engine.count_tokens(messages=head + turns) + answer_room <= engine.context:
            return head + turns
        turns = turns[1:]
        while turns and turns[0]["role"] != "user":  # an exchange starts with the user's message
            turns = turns[1:]
    raise DipstreamError(f"this message does not fit the context of {engine.context} tokens with room for an "
                         "answer: write a shorter one, or start the chat with a larger --context")


def _figures(stats: dict) -> str:
    parts = [f"{stats['new_tokens']} tokens"]
    if stats.get("decode_tokens_per_s"):
        parts.append(f"{stats['decode_tokens_per_s']:.1f} tok/s")
    parts.append(f"first token {stats['ttft_s']:.2f} s")
    if stats.get("disk_bytes_per_token"):  # offloaded: the MLP and a streamed head read the file
        parts.append(f"{stats['disk_bytes_per_token'] / 1e6:.1f} MB read/token")
    if stats.get("hit_rate") is not None:
        parts.append(f"hit rate {stats['hit_rate']:.2f}")
    return "[" + ", ".join(parts) + "]"


def run_chat(cfg: ChatConfig, stdin=None, out=None, err=None) -> int:
    stdin, out, err = stdin or sys.stdin, out or sys.stdout, err or sys.stderr
    engine = open_engine(cfg)
    try:
        chat_template(engine.session.directory)  # a base model has none: refused before the first message
    except BaseException:
        engine.close()
        raise
    room = min(cfg.decoding.max_new_tokens, max(engine.context // 2, 1))
    system = [{"role": "system", "content": cfg.system}] if cfg.system else []
    messages = list(system)

    def quit_on_term(signum, frame):
        raise _Quit

    try:
        old = signal.signal(signal.SIGTERM, quit_on_term)
    except ValueError:  # not the main thread (tests): leave signals alone
        old = None
    print(f"dipstream chat: {cfg.model}, {cfg.method} at density {cfg.density}, context {engine.context} tokens. "
          + HELP, file=err)
    try:
        while True:
            try:
                out.write("> ")
                out.flush()
                line = stdin.readline()
            except KeyboardInterrupt:  # at the prompt: a fresh line
                out.write("\n")
                continue
            if not line or line.strip() == "/exit":
                break
            text = line.rstrip("\n")
            if not text.strip():
                continue
            if text.strip() == "/reset":
                messages = list(system)
                print("(conversation forgotten)", file=err)
                continue
            if text.strip() == "/stats":
                print(engine.stats(), file=err)
                continue
            try:
                messages = fit_history(engine, messages + [{"role": "user", "content": text}], room)
            except DipstreamError as exc:
                print(f"dipstream: {exc}", file=err)
                continue
            said = []
            try:
                for piece in engine.stream(messages=messages, max_tokens=room):
                    said.append(piece)
                    out.write(piece)
                    out.flush()
                out.write("\n")
                print(_figures(engine.last.stats), file=err)
            except KeyboardInterrupt:
                out.write("\n")
                print("[answer stopped]", file=err)
            messages.append({"role": "assistant", "content": "".join(said)})
    except _Quit:
        pass
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
        engine.close()
    return 0
