"""`dipstream serve`: the OpenAI-compatible server gives the engine's own answers (through the official
`openai` client, streamed or not), refuses bad requests with OpenAI's error shape and goes on serving,
queues requests and answers 503 beyond --max-queue, survives clients that leave, stays inside
--memory under concurrent requests, and stops on SIGTERM with exit code 0."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

try:  # the official client's HTTP library: httpx, renamed httpx2 in its 2.x releases
    import httpx2 as httpx
except ImportError:
    import httpx

import dipstream.api

MODEL, CONTEXT = "smollm2-135m", 256
PROMPT = "The three primary colours are"
SAMPLED = {"temperature": 0.8, "seed": 5, "top_p": 0.9}
CHAT = [{"role": "user", "content": "Name a colour."}]


class Server:
    """A `dipstream serve` subprocess on a free port; `url` parsed from its stderr."""

    def __init__(self, *args: str):
        cmd = [sys.executable, "-m", "dipstream.cli.main", "serve", "--model", MODEL, "--port", "0",
               "--context", str(CONTEXT), *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.err: list[str] = []
        self.url = None
        ready = threading.Event()

        def read():  # drains stderr (a full pipe would block the server) and finds the URL
            for line in self.proc.stderr:
                self.err.append(line)
                m = re.search(r"listening on (http://\S+)", line)
                if m:
                    self.url = m.group(1)
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(120) or self.url is None:
            self.proc.kill()
            pytest.fail("the server did not start: " + "".join(self.err))

    def stop(self) -> int:
        """SIGTERM, as a service manager stops it; the exit code."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="x", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    assert s.stop() == 0, "".join(s.err)
    assert "stopping" in "".join(s.err)


@pytest.fixture(scope="module")
def ref():
    """The same engine in this process: the answers the server must give."""
    with dipstream.api.load(MODEL, context=CONTEXT) as e:
        yield e


def _stream_text(chunks, chat: bool) -> tuple[str, str | None]:
    text, finish = "", None
    for ch in chunks:
        if not ch.choices:  # the usage chunk
            continue
        c = ch.choices[0]
        text += (c.delta.content or "") if chat else c.text
        finish = c.finish_reason or finish
    return text, finish


def test_health_and_models(server):
    h = httpx.get(server.url + "/health").json()
    assert h["status"] == "ok" and h["model"] == MODEL and h["context"] == CONTEXT and h["peak_rss_bytes"] > 0
    assert h["memory_budget"] is None and h["queued"] == 0
    models = server.client().models.list().data
    assert [m.id for m in models] == [MODEL]


@pytest.mark.parametrize("params", [{}, SAMPLED], ids=["greedy", "sampled"])
def test_completions_give_the_engines_answer(server, ref, params):
    want = ref.generate(PROMPT, max_tokens=12, **params)
    client = server.client()
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, **params)
    assert r.object == "text_completion" and r.model == MODEL
    assert r.choices[0].text == want.text and r.choices[0].finish_reason == want.finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (want.prompt_tokens, len(want.ids))
    assert r.usage.total_tokens == want.prompt_tokens + len(want.ids)
    chunks = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, stream=True, **params)
    assert _stream_text(chunks, chat=False) == (want.text, want.finish_reason)


@pytest.mark.parametrize("params", [{}, SAMPLED], ids=["greedy", "sampled"])
def test_chat_gives_the_engines_answer(server, ref, params):
    want = ref.chat(CHAT, max_tokens=12, **params)
    client = server.client()
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, **params)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want.text and r.choices[0].finish_reason == want.finish_reason
    assert r.usage.completion_tokens == len(want.ids) and r.usage.prompt_tokens == want.prompt_tokens
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=12, stream=True,
                                                 stream_options={"include_usage": True}, **params))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert _stream_text(chunks, chat=True) == (want.text, want.finish_reason)
    assert chunks[-1].usage.completion_tokens == len(want.ids)


def test_the_answer_is_dipstream_generates(server):
    """The command line's greedy answer (it prints the prompt, then the answer)."""
    out = subprocess.run([sys.executable, "-m", "dipstream.cli.main", "generate", "--model", MODEL, "--prompt", PROMPT,
                          "--max-new-tokens", "10"], check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    r = server.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=10)
    assert out.stdout == PROMPT + r.choices[0].text + "\n"


def test_stop_strings_max_tokens_and_usage(server, ref):
    client = server.client()
    full = ref.generate(PROMPT, max_tokens=12).text
    assert "," in full  # the stop string below comes up
    for stop in (",", [",", "zzz"]):
        r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, stop=stop)
        assert r.choices[0].text == full[:full.index(",")] and r.choices[0].finish_reason == "stop"
        chunks = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, stop=stop, stream=True)
        assert _stream_text(chunks, chat=False) == (full[:full.index(",")], "stop")
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    assert r.usage.prompt_tokens == ref.count_tokens(PROMPT) and r.usage.total_tokens == r.usage.prompt_tokens + 3
    # fields that leave the answer as it is are accepted; the model's name is not checked (as llama-server)
    r = client.completions.create(model="some-other-name", prompt=PROMPT, max_tokens=3, user="u", presence_penalty=0,
                                  frequency_penalty=0, n=1, logprobs=None, extra_body={"top_k": 40})
    assert r.model == MODEL and r.choices[0].text == ref.generate(PROMPT, max_tokens=3).text


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", b"{not json", None),
    ("/v1/completions", b"[1, 2]", None),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": "abc"}, "max_tokens"),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": PROMPT, "temperature": -1}, "temperature"),
    ("/v1/completions", {"prompt": PROMPT, "top_p": 1.5}, "top_p"),
    ("/v1/completions", {"prompt": PROMPT, "seed": -3}, "seed"),
    ("/v1/completions", {"prompt": PROMPT, "n": 2}, "n"),
    ("/v1/completions", {"prompt": PROMPT, "stop": 5}, "stop"),
    ("/v1/completions", {"prompt": PROMPT, "stop": [""]}, None),
    ("/v1/completions", {"prompt": PROMPT, "presence_penalty": 0.5}, "presence_penalty"),
    ("/v1/completions", {"prompt": PROMPT, "echo": True}, "echo"),
    ("/v1/completions", {"prompt": ["a", "b"]}, "prompt"),
    ("/v1/completions", {"prompt": "word " * 400}, "prompt"),
    ("/v1/chat/completions", {"messages": "hi"}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, "messages"),
    ("/v1/chat/completions", {"messages": CHAT, "logprobs": True}, "logprobs"),
    ("/v1/chat/completions", {"messages": CHAT, "tools": [{"type": "function"}]}, "tools"),
])
def test_bad_requests_get_400_and_the_server_goes_on(server, ref, path, body, param):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.post(path, content=body) if isinstance(body, bytes) else c.post(path, json=body)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]
        assert "\n" not in err["message"]
        good = c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4})
        assert good.status_code == 200 and good.json()["choices"][0]["text"] == ref.generate(PROMPT, max_tokens=4).text


def test_unknown_paths_get_404(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.get("/v1/nothing")
        assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
        assert c.get("/v1/completions").status_code == 405
        assert c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}).status_code == 200


def _wait_idle(url: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if httpx.get(url + "/health").json()["queued"] == 0:
            return True
        time.sleep(0.05)
    return False


def test_a_client_leaving_mid_stream_stops_its_generation(server, ref):
    """A long generation (about 250 tokens: seconds) stops as soon as its client leaves."""
    with httpx.Client(base_url=server.url, timeout=60) as c:
        body = {"prompt": PROMPT, "max_tokens": 1000, "ignore_eos": True, "stream": True}
        with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
        assert _wait_idle(server.url, 2.0), "the generation went on after its client left"
        r = c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 6})
        assert r.json()["choices"][0]["text"] == ref.generate(PROMPT, max_tokens=6).text


def test_a_full_queue_gets_503_and_sigterm_ends_requests_in_flight():
    s = Server("--max-queue", "0", "--context", "1024")
    long = {"prompt": PROMPT, "max_tokens": 1000, "ignore_eos": True, "stream": True}  # about 15 s
    events: list[str] = []
    started = threading.Event()

    def stream_until_the_end(c):
        with c.stream("POST", "/v1/completions", json=long) as r:
            for line in r.iter_lines():
                events.append(line)
                started.set()

    try:
        with httpx.Client(base_url=s.url, timeout=60) as c:
            with c.stream("POST", "/v1/completions", json=long) as r:
                assert next(line for line in r.iter_lines() if line.startswith("data: "))  # the engine is busy
                busy = c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
                assert busy.status_code == 503 and busy.json()["error"]["code"] == "queue_full"
            assert _wait_idle(s.url, 3.0)
            assert c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}).status_code == 200
            # a client that gives up on a long answer that is not streamed stops it too
            with pytest.raises(httpx.ReadTimeout):
                c.post("/v1/completions", json={**long, "stream": False}, timeout=1.0)
            assert _wait_idle(s.url, 3.0), "the generation went on after its client left"
            # SIGTERM with a generation in flight: it ends at once with an error event, the server exits 0
            t = threading.Thread(target=stream_until_the_end, args=(c,))
            t.start()
            assert started.wait(30)
            t0 = time.monotonic()
            rc = s.stop()
            t.join(10)
            assert time.monotonic() - t0 < 5
    finally:
        if s.proc.poll() is None:
            s.stop()
    assert rc == 0, "".join(s.err)
    data = [e for e in events if e]
    assert '"server_stopping"' in data[-2] and data[-1] == "data: [DONE]", data[-2:]


def test_concurrent_requests_under_a_memory_cap(tmp_path_factory):
    """12 requests from 4 threads, streamed and not, greedy and sampled, on an offloaded MLP under
    --memory 400MB: every answer is the engine's, and the server's peak RSS stays in the budget."""
    offload = str(tmp_path_factory.mktemp("offload"))
    s = Server("--offload", offload, "--memory", "400MB")
    try:
        prompts = [PROMPT, "Once upon a time", "def fib(n):", "Paris is the capital of", "List three fruits:",
                   "The sea is"]
        jobs = [(prompts[i % 6], i % 2 == 1, SAMPLED if i % 3 == 2 else {}) for i in range(12)]

        def ask(job):
            prompt, stream, params = job
            client = s.client()
            if stream:
                return _stream_text(client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, stream=True,
                                                              **params), chat=False)[0]
            return client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, **params).choices[0].text

        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(ask, jobs))
        health = httpx.get(s.url + "/health").json()
    finally:
        rc = s.stop()
    assert rc == 0, "".join(s.err)
    # the offloaded MLP sums in another order than the one in RAM: the reference is offloaded too
    with dipstream.api.load(MODEL, context=CONTEXT, offload=offload, dram="200MB") as e:
        want = [e.generate(p, max_tokens=8, **params).text for p, _, params in jobs]
    assert got == want
    assert health["memory_budget"] == 400_000_000 and 0 < health["peak_rss_bytes"] <= health["memory_budget"]


def test_help_and_bad_options():
    t = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "dipstream.cli.main", "serve", "--help"], check=False,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--max-queue" in r.stdout and time.monotonic() - t < 20
    for bad in (["--port", "-5"], ["--port", "70000"], ["--context", "1"], ["--max-queue", "-1"]):
        r = subprocess.run([sys.executable, "-m", "dipstream.cli.main", "serve", "--model", MODEL, *bad],
                           check=False, capture_output=True, text=True, timeout=60)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("dipstream: error:"), (bad, r.stderr)
        assert "listening" not in r.stderr
