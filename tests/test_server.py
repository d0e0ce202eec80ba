"""`bitnet-jax serve`: the OpenAI-compatible server, driven as a user would drive it.

`server` is the CLI in a subprocess on a free loopback port (bundled model, 8 slots, context
512), started once for the module and stopped by SIGTERM in the last test. It runs with this
process's JAX flags (conftest.py: JAX_DISABLE_MOST_OPTIMIZATIONS, matmul precision) so that its
greedy outputs can be compared token for token with `bitnet_jax.generate()` run here. The
official `openai` client drives it; raw httpx covers what the client hides (status codes,
disconnects, bodies). `fault_server` is an in-process uvicorn on a copy of the model whose
embedding row FAULT_TOKEN is NaN (untied head, so only prompts ending in that token produce
non-finite logits), for the faults no healthy model can produce.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import jax.numpy as jnp
import pytest

from conftest import IN_CI

if IN_CI:  # the [test] extra installs them: a missing one is a broken install, never a skip
    import openai
    import uvicorn
else:
    openai = pytest.importorskip("openai", reason="needs the [test] extra")
    uvicorn = pytest.importorskip("uvicorn", reason="needs the [serve] extra")
from prometheus_client.parser import text_string_to_metric_families

import bitnet_jax as bj
from bitnet_jax.cli import common
from bitnet_jax.cli import serve as serve_cli
from bitnet_jax.cli.main import main as cli_main
from bitnet_jax.formats import loader
from bitnet_jax.formats.base import Model
from bitnet_jax.runtime.scheduler import Engine
from bitnet_jax.server import ServerState, create_app

KEY = "sk-test-key"
CONTEXT = 512
FAULT_TOKEN = 777
WORDS = ("And God said unto Moses I AM THAT I AM and he said Thus shalt thou say unto the "
         "children of Israel In the beginning was the Word and the Word was with God").split()


def _flags_env() -> dict:
    env = dict(os.environ)
    env.update(JAX_DISABLE_MOST_OPTIMIZATIONS="true", JAX_DEFAULT_MATMUL_PRECISION="highest",
               PYTHONUNBUFFERED="1")
    env.pop("BITNET_JAX_API_KEY", None)
    return env


class Live:
    def __init__(self, proc: subprocess.Popen, url: str, log: list[str]):
        self.proc, self.url, self.log = proc, url, log

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0, **kw)

    def post(self, path: str, body, key: str | None = KEY, **kw) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        return httpx.post(self.url + path, content=data, headers=headers,
                          **dict({"timeout": 60}, **kw))

    def metrics(self) -> dict:
        text = httpx.get(self.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"},
                         timeout=30).text
        return {f.name: f for f in text_string_to_metric_families(text)}


def _sample(families: dict, family: str, sample: str | None = None, **labels) -> float:
    for s in families[family].samples:
        if s.name.endswith("_created"):
            continue
        if (sample is None or s.name == sample) and all(s.labels.get(k) == v
                                                        for k, v in labels.items()):
            return s.value
    return 0.0


@pytest.fixture(scope="module")
def server():
    cmd = [sys.executable, "-m", "bitnet_jax", "serve", "--port", "0", "--slots", "8",
           "--ctx-size", str(CONTEXT), "--api-key", KEY, "--max-queue", "48", "--timeout", "120"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env=_flags_env())
    log: list[str] = []
    ready = threading.Event()
    url = {}

    def read():
        for line in proc.stderr:
            log.append(line.rstrip())
            if "ready at " in line:
                url["url"] = line.split("ready at ")[1].split()[0]
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    deadline = time.time() + 240
    while not ready.wait(0.2):
        assert proc.poll() is None and time.time() < deadline, "server did not start:\n" + \
            "\n".join(log)
    live = Live(proc, url["url"], log)
    yield live
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise


@pytest.fixture(scope="module")
def serve_args():
    return serve_cli.build_parser().parse_args([])  # the server's defaults


@pytest.fixture(scope="module")
def model(serve_args):
    return common.load_model_from_args(serve_args)


@pytest.fixture(scope="module")
def policy(model, serve_args):
    # The server's policy: the CLI's CPU defaults (int8 LM head, float16 KV cache).
    return common.run_policy(serve_args, model)


def _reference(model, policy, prompt, max_tokens, **kw) -> str:
    return bj.generate(model, prompt, max_new_tokens=max_tokens, policy=policy, **kw)[0].text


# ------------------------------------------------------------------------------------------------
# The official client


def test_health_and_models(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}  # public: no key
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["default"]


def test_openai_client_completions_streamed_and_not(server, model, policy):
    client = server.client()
    full = client.completions.create(model="default", prompt="In the beginning", max_tokens=24,
                                     temperature=0)
    choice = full.choices[0]
    assert choice.finish_reason == "length" and full.usage.completion_tokens == 24
    assert full.usage.prompt_tokens == len(model.tokenizer.encode("In the beginning",
                                                                  add_special=True))
    assert choice.text == _reference(model, policy, "In the beginning", 24, temperature=0)
    chunks = list(client.completions.create(model="default", prompt="In the beginning",
                                            max_tokens=24, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    ids = client.completions.create(model="default", prompt=[1, 450, 12], max_tokens=5,
                                    temperature=0, logprobs=3)
    lp = ids.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 5
    assert all(len(top) == 3 and max(top.values()) >= v - 1e-6
               for top, v in zip(lp.top_logprobs, lp.token_logprobs))


def test_openai_client_chat_streamed_and_not(server, model, policy):
    client = server.client()
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Who made the heaven?"}]
    full = client.chat.completions.create(model="default", messages=messages, max_tokens=20,
                                          temperature=0, logprobs=True, top_logprobs=2)
    text = full.choices[0].message.content
    assert full.choices[0].message.role == "assistant"
    assert text == _reference(model, policy, [messages], 20, temperature=0)
    content = full.choices[0].logprobs.content
    assert len(content) == full.usage.completion_tokens
    assert all(len(c.top_logprobs) == 2 for c in content)
    stream = client.chat.completions.create(model="default", messages=messages, max_tokens=20,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.total_tokens == full.usage.total_tokens


def test_n_choices_use_consecutive_seeds(server, model, policy):
    out = server.client().completions.create(model="default", prompt="And God said", n=3,
                                             max_tokens=12, temperature=0.9, seed=41,
                                             extra_body={"top_k": 40})
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    for c in out.choices:
        assert c.text == _reference(model, policy, "And God said", 12, temperature=0.9,
                                    top_k=40, seed=41 + c.index)
    assert out.usage.completion_tokens == 36


def test_32_concurrent_streams_complete_and_match_generate(server, model, policy):
    rng = random.Random(0)
    jobs = []
    for i in range(32):
        # Prompts of 2..14 tokens and 20..48 new tokens: generate() alone then uses one cache
        # bucket (64) for all of them, so the references compile once.
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 10)))
        settings = [{"temperature": 0}, {"temperature": 0, "repeat_penalty": 1.3},
                    {"temperature": 0.8, "seed": i, "top_p": 0.9},
                    {"temperature": 1.0, "seed": i, "min_p": 0.05, "top_k": 20}][i % 4]
        stop = [" the"] if i % 5 == 0 else None
        jobs.append((prompt, rng.randint(20, 48), settings, stop))
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)

    async def one(prompt, max_tokens, settings, stop):
        extra = {k: v for k, v in settings.items() if k in ("repeat_penalty", "min_p", "top_k")}
        std = {k: v for k, v in settings.items() if k not in extra}
        stream = await client.completions.create(model="default", prompt=prompt, stream=True,
                                                 max_tokens=max_tokens, stop=stop,
                                                 extra_body=extra, **std)
        text, finish = "", None
        async for chunk in stream:
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        return text, finish

    async def run_all():
        return await asyncio.gather(*(one(*job) for job in jobs))

    results = asyncio.run(run_all())
    for (prompt, max_tokens, settings, stop), (text, finish) in zip(jobs, results):
        kw = dict(settings)
        if "repeat_penalty" in kw:
            kw["repetition_penalty"] = kw.pop("repeat_penalty")
        assert finish in ("stop", "length")
        assert text == _reference(model, policy, prompt, max_tokens, stop=stop, **kw), \
            (prompt, settings, stop)


# ------------------------------------------------------------------------------------------------
# Disconnects free their slots


def _wait_idle(server, cancelled_before: float, timeout: float = 20.0) -> dict:
    deadline = time.time() + timeout
    while True:
        fams = server.metrics()
        idle = _sample(fams, "bitnet_jax_busy_slots") == 0 and \
            _sample(fams, "bitnet_jax_queue_depth") == 0
        cancelled = _sample(fams, "bitnet_jax_finished_requests", finish_reason="cancelled")
        if (idle and cancelled > cancelled_before) or time.time() > deadline:
            return fams
        time.sleep(0.1)


def test_client_closing_a_stream_cancels_its_requests(server):
    before = _sample(server.metrics(), "bitnet_jax_finished_requests",
                     finish_reason="cancelled")
    body = {"prompt": "In the beginning", "max_tokens": 500, "n": 16, "stream": True,
            "ignore_eos": True, "temperature": 0.7, "seed": 3}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: {"):
                break  # one chunk arrived: hang up mid-stream
    fams = _wait_idle(server, before)
    assert _sample(fams, "bitnet_jax_busy_slots") == 0
    assert _sample(fams, "bitnet_jax_finished_requests", finish_reason="cancelled") > before


def test_client_giving_up_on_a_plain_request_cancels_it(server):
    before = _sample(server.metrics(), "bitnet_jax_finished_requests",
                     finish_reason="cancelled")
    body = {"prompt": "In the beginning", "max_tokens": 500, "n": 16, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        server.post("/v1/completions", body, timeout=httpx.Timeout(30, read=0.5))
    fams = _wait_idle(server, before)
    assert _sample(fams, "bitnet_jax_finished_requests", finish_reason="cancelled") > before


# ------------------------------------------------------------------------------------------------
# Errors: OpenAI's shape, the right status, never a 500 for a user error


def _error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param and param in error["message"]
    return error


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "max_tokens": "ten"}, "max_tokens"),
    ({"prompt": "x", "logprobs": 50}, "logprobs"),
    ({"prompt": "x", "stop": [""]}, "stop"),
    ({"prompt": "x", "seed": -3}, "seed"),
    ({"prompt": "x", "repeat_penalty": 0}, "repeat_penalty"),
    ({"prompt": "x", "presence_penalty": 0.5}, "presence_penalty"),
    ({"prompt": [3, 99999]}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"max_tokens": 3}, "prompt"),
])
def test_bad_parameters_are_400_naming_the_field(server, body, param):
    _error(server.post("/v1/completions", body), 400, param)


def test_error_statuses(server):
    _error(server.post("/v1/completions", b'{"prompt": "x",'), 400)
    _error(server.post("/v1/completions", b'["a list"]'), 400)
    _error(server.post("/v1/chat/completions", {"messages": [{"role": "robot",
                                                              "content": "hi"}]}), 400,
           "messages.0.role")
    _error(server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                "tools": [{"type": "function"}]}), 400, "tools")
    too_long = _error(server.post("/v1/completions", {"prompt": [5] * (CONTEXT + 1)}), 400,
                      "prompt")
    assert too_long["code"] == "context_length_exceeded"
    fitted = server.post("/v1/completions", {"prompt": [5] * (CONTEXT + 1), "truncate": True,
                                             "max_tokens": 2})
    assert fitted.status_code == 200 and fitted.json()["usage"]["prompt_tokens"] <= CONTEXT - 2
    assert _error(server.post("/v1/completions", {"prompt": "x"}, key=None), 401)["code"] == \
        "invalid_api_key"
    _error(server.post("/v1/completions", {"prompt": "x"}, key="sk-wrong"), 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0
                      ).models.list()
    with pytest.raises(openai.NotFoundError):
        server.client().completions.create(model="gpt-4", prompt="x", max_tokens=1)
    assert _error(server.post("/v1/completions", {"model": "gpt-4", "prompt": "x"}),
                  404)["code"] == "model_not_found"
    _error(server.post("/v1/nothing", {}), 404)
    _error(httpx.get(server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}),
           405)
    # 8 slots + 48 queue places < 64 choices: the queue fills while they are submitted.
    full = _error(server.post("/v1/completions", {"prompt": "x", "n": 64, "max_tokens": 64}),
                  429)
    assert full["code"] == "queue_full"
    _wait_idle(server, -1)


def test_body_too_large_is_413(server):
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}"
                     f"\r\nContent-Type: application/json\r\nContent-Length: {1 << 30}\r\n\r\n"
                     "{".encode())
        reply = _read_reply(sock)
    assert reply.startswith("HTTP/1.1 413")
    assert json.loads(reply.split("\r\n\r\n", 1)[1])["error"]["code"] == "request_too_large"


def _read_reply(sock) -> str:
    """One HTTP response read whole: headers and body can arrive in separate segments."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data.decode()
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), None)
    while length is not None and len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return (head + b"\r\n\r\n" + body).decode()


# ------------------------------------------------------------------------------------------------
# Metrics and compilation


def test_metrics_parse_with_prometheus_client(server):
    fams = server.metrics()
    for name, kind in [("bitnet_jax_requests", "counter"), ("bitnet_jax_prompt_tokens", "counter"),
                       ("bitnet_jax_generated_tokens", "counter"),
                       ("bitnet_jax_queue_depth", "gauge"), ("bitnet_jax_busy_slots", "gauge"),
                       ("bitnet_jax_time_to_first_token_seconds", "histogram"),
                       ("bitnet_jax_inter_token_latency_seconds", "histogram")]:
        assert fams[name].type == kind, name
    assert _sample(fams, "bitnet_jax_requests", endpoint="/v1/completions", status="200") > 0
    assert _sample(fams, "bitnet_jax_requests", endpoint="/v1/completions", status="400") > 0
    assert _sample(fams, "bitnet_jax_generated_tokens") > 0
    assert _sample(fams, "bitnet_jax_time_to_first_token_seconds",
                   "bitnet_jax_time_to_first_token_seconds_count") > 0
    assert _sample(fams, "bitnet_jax_slots") == 8 and _sample(fams, "bitnet_jax_ready") == 1


def test_50_mixed_requests_after_warmup_do_not_recompile(server):
    def traces():
        fams = server.metrics()
        return {s.labels["program"]: s.value for s in fams["bitnet_jax_program_traces"].samples}

    before = traces()
    assert before.get("prefill", 0) > 0 and before.get("decode", 0) > 0
    rng = random.Random(1)
    bodies = []
    for i in range(50):
        n_prompt = rng.choice([1, 3, 17, 40, 100, 200, 300, 480])
        body = {"prompt": [rng.randrange(3, 4096) for _ in range(n_prompt)],
                "max_tokens": rng.randint(1, 30), "temperature": rng.choice([0, 0.7, 1.3]),
                "seed": i, "top_k": rng.choice([0, 5]), "stream": i % 3 == 0}
        if i % 4 == 1:
            body["logprobs"] = rng.randint(0, 5)
        bodies.append(body)
    with concurrent.futures.ThreadPoolExecutor(24) as pool:  # 24 at a time: within the queue
        responses = list(pool.map(lambda b: server.post("/v1/completions", b), bodies))
    assert [r.status_code for r in responses] == [200] * 50, \
        [r.text for r in responses if r.status_code != 200][:3]
    assert traces() == before


# ------------------------------------------------------------------------------------------------
# Faults one request causes end that request alone (in-process server)


def _faulty_model() -> Model:
    """The bundled model, untied, with embedding row FAULT_TOKEN NaN: a prompt ending in it
    carries NaN in its residual stream to the float LM head (a NaN earlier in the prompt is
    laundered by the int8 activation quantiser of the CPU kernels); other rows stay finite."""
    base = loader.load_model(loader.DEFAULT_MODEL)
    params = dict(base.params)
    params["lm_head"] = base.params["embed_tokens"]
    params["embed_tokens"] = base.params["embed_tokens"].at[FAULT_TOKEN].set(jnp.nan)
    cfg = base.config.replace(tie_word_embeddings=False)
    return Model(cfg, params, base.tokenizer, base.policy, base.source)


@pytest.fixture(scope="module")
def fault_server():
    model = _faulty_model()
    engine = Engine(model, slots=2, context=64, backend="cpu")
    state = ServerState("faulty", model.tokenizer, model.config.vocab_size)
    config = uvicorn.Config(create_app(state), lifespan="off", log_level="warning")
    srv = uvicorn.Server(config)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline
        time.sleep(0.05)
    # Up, but the engine is not warm yet: /health and generation answer 503.
    assert httpx.get(url + "/health").status_code == 503
    assert httpx.post(url + "/v1/completions", json={"prompt": "x"}).json()["error"]["code"] \
        == "loading"
    engine.warmup(prompt_lengths=[16])
    engine.start()
    state.set_ready(engine)
    yield url, state
    srv.should_exit = True
    thread.join(30)
    engine.shutdown(drain=False)


def _sse(response: httpx.Response) -> list:
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    return [e if e == "[DONE]" else json.loads(e) for e in events]


def test_non_finite_logits_end_that_request_alone(fault_server):
    url, _ = fault_server
    bad = {"prompt": [1, 20, 30, FAULT_TOKEN], "max_tokens": 20}  # read at the last position
    good = {"prompt": [1, 20, 30], "max_tokens": 20, "ignore_eos": True, "temperature": 0}

    async def both():
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            return await asyncio.gather(
                client.post("/v1/completions", json=dict(bad, stream=True)),
                client.post("/v1/completions", json=good),
                client.post("/v1/completions", json=bad))

    streamed, healthy, plain = asyncio.run(both())
    events = _sse(streamed)
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "generation_error"
    assert "non-finite" in events[-2]["error"]["message"]
    assert healthy.status_code == 200 and healthy.json()["usage"]["completion_tokens"] == 20
    error = _error(plain, 500)
    assert error["type"] == "server_error" and "non-finite" in error["message"]


def test_per_request_timeout(fault_server):
    url, state = fault_server
    state.timeout = 1e-9  # every request is past its deadline when the engine first sees it
    try:
        assert _error(httpx.post(url + "/v1/completions", json={"prompt": "x"}, timeout=30),
                      504)["code"] == "timeout"
        events = _sse(httpx.post(url + "/v1/chat/completions", timeout=30, json={
            "messages": [{"role": "user", "content": "x"}], "stream": True}))
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "timeout"
    finally:
        state.timeout = None


# ------------------------------------------------------------------------------------------------
# The command line


def test_serve_bad_flag_is_one_line(capsys):
    assert cli_main(["serve", "--port", "http"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--port" in err[0]


def test_serve_refuses_multi_host_with_one_line(capsys):
    # Multi-host serving would need every process to follow process 0's engine steps.
    assert cli_main(["serve", "--coordinator", "127.0.0.1:1", "--num-processes", "2",
                     "--process-id", "0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "one host" in err[0] and "--tensor-parallel" in err[0]


def test_serve_without_the_extra_says_how_to_install_it(monkeypatch, capsys):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "uvicorn" else real(name, *a))
    assert cli_main(["serve"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'pip install "bitnet-jax[serve]"' in err[0]


def test_serve_busy_port_is_one_line(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert cli_main(["serve", "--port", str(taken.getsockname()[1])]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--port" in err[0]


# ------------------------------------------------------------------------------------------------
# Last: SIGTERM drains (this stops the module's server)


def test_sigterm_drains_in_flight_streams_then_exits_zero(server):
    body = {"prompt": "In the beginning", "max_tokens": 400, "n": 8, "stream": True,
            "ignore_eos": True, "temperature": 0.8, "seed": 5}
    events: list = []
    started = threading.Event()

    def stream():
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {KEY}"}) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    started.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert started.wait(30)
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.1)
    try:  # while draining new requests get 503; once drained the port is closed
        late = server.post("/v1/completions", {"prompt": "x", "max_tokens": 1}, timeout=5)
        assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
    except httpx.TransportError:
        pass
    reader.join(60)
    assert not reader.is_alive() and events[-1] == "[DONE]"
    finished = [json.loads(e)["choices"][0] for e in events[:-1] if '"finish_reason":"' in e]
    assert len(finished) == 8 and all(c["finish_reason"] == "length" for c in finished)
    assert server.proc.wait(60) == 0
    assert any("draining" in line for line in server.log)
