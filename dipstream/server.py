"""`dipstream serve`: an OpenAI-compatible HTTP server on one engine (starlette on uvicorn).

    GET  /health                {"status": "ok", model, context, memory budget, peak RSS, requests queued}
    GET  /v1/models             the one model served
    POST /v1/completions        {"prompt": "...", ...}           "stream": true: server-sent events
    POST /v1/chat/completions   {"messages": [{"role", "content"}], ...}

Parameters: max_tokens (chat: also max_completion_tokens; default --max-new-tokens), temperature (0 or
absent: greedy, as `dipstream generate` decodes by default; > 0 samples), top_p, top_k (an extension),
seed, stop (a string or a list), n (1 only), ignore_eos (an extension: always max_tokens),
stream_options.include_usage. Fields that would change the answer in ways the engine does not do
(n > 1, logprobs, echo, penalties, logit_bias, tools, a JSON response format) are refused with 400;
other fields are ignored. The request's "model" is not checked (as llama-server does): the answer
names the model served.

One engine runs one generation at a time: requests are checked in full on the event loop, then
wait in a queue for the worker thread that runs the engine; beyond --max-queue waiting, 503. A
client that leaves stops its generation (streaming: at the next piece; otherwise within a second).
SIGINT or SIGTERM stops the server: generations in flight end at once with 503 (streaming: an error
event), the engine is closed, the exit code is 0.
"""

from __future__ import annotations

import asyncio
import json
import queue
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field

from dipstream.api import SessionConfig, stop_strings, open_engine
from dipstream.errors import DipstreamError


@dataclass
class ServeConfig(SessionConfig):
    """The server: where it listens, how many requests wait, and the engine it serves."""

    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on"})
    port: int = field(default=8080, metadata={"help": "TCP port (0: any free port, printed at start)"})
    max_queue: int = field(default=8, metadata={
        "help": "requests waiting for the engine beyond the one it runs; more get 503"})

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.host, str) or not self.host:
            raise DipstreamError("--host: give an address to listen on (127.0.0.1, 0.0.0.0, ::1, ...)")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise DipstreamError(f"--port {self.port!r}: give a TCP port from 0 to 65535 (0: any free port)")
        if isinstance(self.max_queue, bool) or not isinstance(self.max_queue, int) or self.max_queue < 0:
            raise DipstreamError(f"--max-queue {self.max_queue!r}: give the requests that may wait (0 or more)")


class BadRequest(Exception):
    """A request refused before it is queued: HTTP `status` with OpenAI's error body."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.param, self.status, self.kind, self.code = param, status, kind, code


def _error(message: str, status: int = 400, param=None, kind="invalid_request_error", code=None):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


# ------------------------------------------------------------------ the engine's thread

_STOPPING = BadRequest("the server is stopping", status=503, kind="server_error", code="server_stopping")


class Job:
    """One request's generation; the worker hands its pieces (when streamed) and its end to the
    event loop's queue."""

    def __init__(self, kwargs: dict, stream: bool, loop: asyncio.AbstractEventLoop):
        self.kwargs, self.stream, self.loop = kwargs, stream, loop
        self.out: asyncio.Queue = asyncio.Queue()
        self.cancelled = False  # set on the event loop when the client or the server gave up

    def put(self, kind: str, value=None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed: nobody waits any more
            self.cancelled = True


class Worker:
    """The one thread that runs the engine (it is not thread-safe): jobs in arrival order."""

    def __init__(self, engine, max_queue: int):
        self.engine, self.max_queue = engine, max_queue
        self.jobs: queue.Queue = queue.Queue()
        self.outstanding = 0  # queued + running; changed under the lock from both threads
        self.lock = threading.Lock()
        self.stopping = False  # set when the server stops: generations end, waiting requests are refused
        self.thread = threading.Thread(target=self._run, name="dipstream-engine", daemon=True)
        self.thread.start()

    def submit(self, kwargs: dict, stream: bool) -> Job:
        with self.lock:
            if self.outstanding > self.max_queue:  # the running one plus max_queue waiting
                raise BadRequest(f"the server is busy: {self.outstanding - 1} requests wait for the engine "
                                 f"(--max-queue {self.max_queue}); retry later", status=503, kind="server_error",
                                 code="queue_full")
            self.outstanding += 1
        job = Job(kwargs, stream, asyncio.get_running_loop())
        self.jobs.put(job)
        return job

    def stop(self) -> None:
        self.jobs.put(None)
        self.thread.join()

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            try:
                if self.stopping:
                    job.put("error", _STOPPING)
                elif not job.cancelled:
                    self._generate(job)
            except DipstreamError as exc:
                job.put("error", BadRequest(str(exc)))
            except Exception as exc:  # noqa: BLE001 - a bug: this request fails, the server goes on
                print(f"dipstream serve: internal error ({type(exc).__name__}: {exc})", file=sys.stderr)
                job.put("error", BadRequest(f"internal error ({type(exc).__name__})", status=500,
                                            kind="server_error"))
            finally:
                with self.lock:
                    self.outstanding -= 1

    def _generate(self, job: Job) -> None:
        pieces = self.engine.stream(**job.kwargs)
        try:
            for piece in pieces:
                if job.cancelled:
                    return  # closing the generator ends the engine's decode
                if self.stopping:
                    job.put("error", _STOPPING)
                    return
                if job.stream:
                    job.put("piece", piece)
        finally:
            pieces.close()
        job.put("done", self.engine.last)


# ------------------------------------------------------------------ requests

# fields that would change the answer in ways the engine does not do, and the values that do not
_NEUTRAL = {"n": (1,), "best_of": (1,), "echo": (False,), "logprobs": (False, 0), "top_logprobs": (0,),
            "frequency_penalty": (0,), "presence_penalty": (0,), "repetition_penalty": (1,), "logit_bias": ({},),
            "suffix": ("",), "tools": ([],), "functions": ([],), "tool_choice": ("none", "auto"),
            "function_call": ("none", "auto"), "response_format": ({"type": "text"},)}
_FLAGS = {"max-new-tokens": "max_tokens", "sample-seed": "seed", "top-k": "top_k", "top-p": "top_p",
          "temperature": "temperature"}
_KINDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "an object"}


def _field(body: dict, name: str, kind: type):
    """body[name] when it is of `kind` (a JSON number for float; never a bool for a number), else None
    when absent or null; 400 otherwise."""
    v = body.get(name)
    ok = (isinstance(v, int | float) if kind is float else isinstance(v, kind)) and \
        (kind is bool or not isinstance(v, bool))
    if v is not None and not ok:
        raise BadRequest(f"{name}: expected {_KINDS[kind]}, got {json.dumps(v)[:60]}", name)
    return v


def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise BadRequest("messages: give a non-empty list of {\"role\", \"content\"} objects", "messages")
    out = []
    for m in msgs:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):  # content parts: text ones only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise BadRequest("messages: only text content parts are supported", "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(content, str):
            raise BadRequest("messages: each message needs a \"role\" string and a \"content\" string", "messages")
        out.append({"role": m["role"], "content": content})
    return out


def parse_request(engine, body, chat: bool) -> dict:
    """The `Engine.stream` arguments of a request body, every field checked (400 otherwise)."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    for name, neutral in _NEUTRAL.items():
        if body.get(name) is not None and body[name] not in neutral:
            raise BadRequest(f"{name} {json.dumps(body[name])[:60]} is not supported by dipstream serve", name)
    for name in ("stream", "ignore_eos"):
        _field(body, name, bool)
    _field(body, "stream_options", dict)
    decoding = {"max_tokens": _field(body, "max_tokens", int), "temperature": _field(body, "temperature", float),
                "top_p": _field(body, "top_p", float), "top_k": _field(body, "top_k", int),
                "seed": _field(body, "seed", int), "ignore_eos": bool(body.get("ignore_eos"))}
    if chat and _field(body, "max_completion_tokens", int) is not None:
        decoding["max_tokens"] = body["max_completion_tokens"]
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, str | list):
        raise BadRequest("stop: give a string or a list of strings", "stop")
    if chat:
        text = {"messages": _messages(body)}
    elif isinstance(body.get("prompt"), str):
        text = {"prompt": body["prompt"]}
    else:
        raise BadRequest("prompt: give the text to continue as one string", "prompt")
    try:
        stop_strings(stop)
        engine.decode_options(**decoding)  # types and ranges (DecodeOptions.validate)
        n = engine.count_tokens(text.get("prompt"), messages=text.get("messages"))
    except DipstreamError as exc:  # DecodeOptions names the CLI's flags: name the request's fields
        message, param = str(exc), None
        for flag, name in _FLAGS.items():
            if flag in message:
                message, param = message.replace("--" + flag, name).replace(flag, name), name
                break
        raise BadRequest(message, param) from None
    if n >= engine.context:
        raise BadRequest(f"the prompt has {n} tokens; the server's context holds {engine.context} with its answer "
                         "(give a shorter prompt, or start the server with a larger --context)",
                         "messages" if chat else "prompt", code="context_length_exceeded")
    return {**text, "stop": stop or (), **decoding}


# ------------------------------------------------------------------ the app

def make_app(cfg: ServeConfig, state: dict):
    """The starlette app; `state` gets the engine and its worker once loaded (the app is made before
    the model is loaded, so its modules count in the memory plan's baseline)."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    from dipstream.devices import peak_rss_bytes, rss_bytes

    async def health(request):
        return JSONResponse({"status": "ok", "model": cfg.model, "method": cfg.method,
                             "context": state["engine"].context, "memory_budget": state["budget"],
                             "rss_bytes": rss_bytes(), "peak_rss_bytes": peak_rss_bytes(),
                             "queued": state["worker"].outstanding})

    async def models(request):
        return JSONResponse({"object": "list", "data": [{"id": cfg.model, "object": "model", "created": state["t0"],
                                                         "owned_by": "dipstream"}]})

    async def completions(request, chat: bool = False):
        try:
            try:
                body = json.loads(await request.body())
            except ValueError as exc:
                raise BadRequest(f"the request body is not JSON ({exc})") from None
            kwargs = parse_request(state["engine"], body, chat)
            job = state["worker"].submit(kwargs, bool(body.get("stream")))
        except BadRequest as e:
            return _error(str(e), e.status, e.param, e.kind, e.code)
        head = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, "created": int(time.time()),
                "model": cfg.model}
        if job.stream:
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(_events(job, head, chat, usage), media_type="text/event-stream")
        try:
            while True:
                try:
                    kind, value = await asyncio.wait_for(job.out.get(), 0.5)
                    break
                except TimeoutError:  # not done yet: is the client still there?
                    if await request.is_disconnected():
                        return _error("the client left", 499)
        finally:
            job.cancelled = True  # a no-op once done; stops the engine when the client left or the server stops
        if kind == "error":
            return _error(str(value), value.status, value.param, value.kind, value.code)
        c = value
        choice = {"index": 0, "message": {"role": "assistant", "content": c.text}} if chat else \
            {"index": 0, "text": c.text, "logprobs": None}
        return JSONResponse({**head, "object": "chat.completion" if chat else "text_completion",
                             "choices": [{**choice, "finish_reason": c.finish_reason}], "usage": _usage(c)})

    async def chat_completions(request):
        return await completions(request, chat=True)

    async def http_error(request, exc):  # 404, 405 in OpenAI's error shape
        return _error(f"{request.method} {request.url.path}: {exc.detail}", exc.status_code, code=str(exc.status_code))

    routes = [Route("/health", health), Route("/v1/models", models),
              Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/chat/completions", chat_completions, methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error})


def _usage(c) -> dict:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": len(c.ids),
            "total_tokens": c.prompt_tokens + len(c.ids)}


async def _events(job: Job, head: dict, chat: bool, usage: bool):
    """OpenAI's server-sent events of a streamed answer: chunks, a last one with the finish reason
    (and usage when asked), then [DONE]."""
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str | None, finish=None, delta=None) -> str:
        choice = {"index": 0, "delta": delta if delta is not None else {"content": text}} if chat else \
            {"index": 0, "text": text or "", "logprobs": None}
        return f"data: {json.dumps({**head, 'object': obj, 'choices': [{**choice, 'finish_reason': finish}]})}\n\n"

    try:
        if chat:
            yield chunk(None, delta={"role": "assistant", "content": ""})
        while True:
            kind, value = await job.out.get()
            if kind == "piece":
                yield chunk(value)
            elif kind == "done":
                yield chunk(None, value.finish_reason, delta={} if chat else None)
                if usage:
                    yield f"data: {json.dumps({**head, 'object': obj, 'choices': [], 'usage': _usage(value)})}\n\n"
                break
            else:  # the status line went out already: the error is an event
                error = {"message": str(value), "type": value.kind, "param": value.param, "code": value.code}
                yield f"data: {json.dumps({'error': error})}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled = True  # the client left (the stream was cancelled) or the answer is complete


# ------------------------------------------------------------------ the command

def run_serve(cfg: ServeConfig) -> int:
    """Check `cfg`, load the engine, serve until SIGINT or SIGTERM, then stop: requests in flight end
    with 503, the engine is closed. Returns the exit code (0)."""
    cfg.validate()
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError:
        raise DipstreamError("dipstream serve needs starlette and uvicorn: pip install starlette uvicorn") from None

    state: dict = {"t0": int(time.time())}
    app = make_app(cfg, state)
    family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
    sock = socket.create_server((cfg.host, cfg.port), family=family)  # "address in use" before the load
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=5)
    config.load()  # uvicorn's protocol modules imported before the plan measures the baseline
    server = uvicorn.Server(config)
    try:
        engine = open_engine(cfg)  # after the app and the server: their memory is in --memory's plan
    except BaseException:
        sock.close()
        raise
    plan = engine.session.plan.row()
    state.update(engine=engine, worker=Worker(engine, cfg.max_queue), budget=plan["memory_budget"])
    budget = f", --memory {plan['memory_budget'] / 1e6:.0f} MB" if plan["memory_budget"] else ""
    print(f"dipstream serve: {cfg.model} {cfg.method} @ {cfg.density}, context {engine.context}, "
          f"{engine.session.threads} threads{', offload ' + cfg.offload if cfg.offload else ''}{budget}, "
          f"{(plan['static_bytes'] + plan['kv_bytes'] + plan['mlp_ram_bytes']) / 1e6:.0f} MB planned", file=sys.stderr)
    # uvicorn serves in a thread: it then leaves the signal handlers alone, and SIGINT and SIGTERM
    # reach the main thread as KeyboardInterrupt (dipstream.cli's stop_on_sigterm), which stops it
    done = threading.Event()  # waited on, not the thread: a Thread.join cut by a signal may mark it ended early

    def serve():
        try:
            server.run(sockets=[sock])
        finally:
            done.set()

    thread = threading.Thread(target=serve, name="dipstream-http")
    thread.start()
    try:
        try:
            while not server.started and not done.wait(0.02):
                pass
            if server.started:
                port = sock.getsockname()[1]
                where = f"[{cfg.host}]" if family == socket.AF_INET6 else cfg.host
                print(f"dipstream serve: listening on http://{where}:{port}", file=sys.stderr, flush=True)
            while not done.wait(0.5):
                pass
        except KeyboardInterrupt:
            print("dipstream serve: stopping", file=sys.stderr, flush=True)
            state["worker"].stopping = True  # in-flight requests end with 503 (or an error event) right away
            server.should_exit = True
            while not done.is_set():
                try:
                    done.wait(0.5)
                except KeyboardInterrupt:  # a second signal: stop without waiting for requests
                    server.force_exit = True
    finally:
        server.should_exit = True
        done.wait()
        thread.join()
        state["worker"].stop()  # requests are all answered or cancelled: the worker is idle or ends soon
        engine.close()
    return 0 if server.started else 1  # uvicorn said why it did not start
