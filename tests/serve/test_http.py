"""The OpenAI-compatible HTTP API against a real server on 127.0.0.1 (a free port), with the official `openai`
client and with curl: completions, chat, streaming, logprobs, stop, errors as 4xx JSON while the server goes
on serving, /v1/models, /health, /metrics; the engine worker is the one the gRPC server uses."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.error
import urllib.request

import openai
import pytest
from moeflow.serve.client import MoeflowClient
from moeflow.serve.config import ServerConfig
from moeflow.serve.http import start_http
from moeflow.serve.server import start

import moeflow
from moeflow.engine.chat import chat_prompt

PROMPT = "def f(x):"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def f(x):"}]


@pytest.fixture(scope="module")
def served(tiny_checkpoints):
    """gRPC and HTTP over one worker; `expected` holds what the engine generates alone, computed first."""
    engine = moeflow.load(tiny_checkpoints["qwen3_moe"])
    chat = chat_prompt(engine.tokenizer, MESSAGES)
    expected = {
        "completion": engine.generate(PROMPT, max_new_tokens=12),
        "chat": engine.generate(chat.text, max_new_tokens=12, stop=chat.stop),
        "penalised": engine.generate(PROMPT, max_new_tokens=12, repetition_penalty=1.5, top_k=3),
    }
    running = start(engine, ServerConfig(port=0, max_batch_size=4), model_name="tiny-qwen3")
    http = start_http(running.worker, ServerConfig(http_port=0), model_name="tiny-qwen3")
    client = openai.OpenAI(base_url=f"{http.url}/v1", api_key="unused", max_retries=0, timeout=60)
    yield {"http": http, "grpc": running, "client": client, "expected": expected, "engine": engine}
    http.shutdown()
    running.shutdown(5)
    engine.close()


def _post(url: str, body: bytes | dict) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_completion_equals_the_engine(served):
    r = served["client"].completions.create(model="tiny-qwen3", prompt=PROMPT, max_tokens=12, temperature=0)
    want = served["expected"]["completion"]
    assert r.choices[0].text == want.text
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(want.prompt_token_ids), 12)
    assert r.object == "text_completion" and r.model == "tiny-qwen3"


def test_extra_sampling_fields_reach_the_engine(served):
    r = served["client"].completions.create(
        model="m", prompt=PROMPT, max_tokens=12, extra_body={"repetition_penalty": 1.5, "top_k": 3}
    )
    assert r.choices[0].text == served["expected"]["penalised"].text
    assert served["expected"]["penalised"].text != served["expected"]["completion"].text


def test_chat_uses_the_transcript_template(served):
    r = served["client"].chat.completions.create(model="m", messages=MESSAGES, max_tokens=12)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == served["expected"]["chat"].text
    assert r.object == "chat.completion"


def test_streams_add_up_to_the_whole_text(served):
    import time

    client = served["client"]
    # Tokens the engine produced while the last piece was being sent go out together, so how many pieces there are
    # depends on timing: a tiny model that decodes 12 tokens in ~10 ms can finish before the first piece leaves.
    # Each forward is held up 30 ms here, so text that streams as it is made comes in several pieces.
    slow = served["engine"].model.register_forward_hook(lambda *_: time.sleep(0.03))
    try:
        pieces = [
            c.choices[0].text
            for c in client.completions.create(model="m", prompt=PROMPT, max_tokens=12, stream=True)
        ]
    finally:
        slow.remove()
    assert "".join(pieces) == served["expected"]["completion"].text and len(pieces) >= 2
    chunks = list(
        client.chat.completions.create(
            model="m", messages=MESSAGES, max_tokens=12, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == served["expected"]["chat"].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_logprobs_and_stop(served):
    client = served["client"]
    r = client.completions.create(model="m", prompt=PROMPT, max_tokens=12, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == 12 and all(len(t) <= 2 for t in lp.top_logprobs)
    assert all(v <= 0 for v in lp.token_logprobs)
    r = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=6, logprobs=True, top_logprobs=3)
    assert all(len(c.top_logprobs) == 3 for c in r.choices[0].logprobs.content)
    text = served["expected"]["completion"].text
    stop = text[4:6]
    r = client.completions.create(model="m", prompt=PROMPT, max_tokens=12, stop=[stop])
    assert r.choices[0].text == text[: text.find(stop)] and r.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    "kw, words",
    [
        ({"extra_body": {"top_k": -1}}, "top_k must be an integer >= 0"),
        ({"extra_body": {"min_p": 2}}, "min_p must be in [0, 1]"),
        ({"temperature": -1}, "temperature must be in [0, 100]"),
        ({"n": 2}, "n=2 is not supported"),
        ({"frequency_penalty": 0.5}, "use repetition_penalty instead"),
        ({"logit_bias": {"5": 3}}, "logit_bias={'5': 3} is not supported"),
        ({"max_tokens": 100_000}, "this server allows at most 1024"),
        ({"prompt": ["a", "b"]}, "send one request per prompt"),
        ({"logprobs": 9}, "logprobs must be an integer in [0, 5]"),
    ],
)
def test_bad_request_is_a_400_with_a_json_error_and_the_server_goes_on(served, kw, words):
    client = served["client"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="m", **{"prompt": PROMPT, "max_tokens": 4, **kw})
    assert e.value.status_code == 400
    assert words in e.value.body["message"] and e.value.body["type"] == "invalid_request_error"
    r = client.completions.create(model="m", prompt=PROMPT, max_tokens=12)
    assert r.choices[0].text == served["expected"]["completion"].text


def test_malformed_bodies_and_routes(served):
    url = served["http"].url
    status, body = _post(f"{url}/v1/completions", b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = _post(f"{url}/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]})
    assert status == 400 and "messages[0].role must be one of" in body["error"]["message"]
    status, body = _post(f"{url}/v1/nothing", {})
    assert status == 404 and "error" in body


def test_one_worker_serves_grpc_and_http(served):
    with MoeflowClient(served["grpc"].address) as grpc_client:
        reply = grpc_client.generate(PROMPT, max_new_tokens=12)
    assert reply.text == served["expected"]["completion"].text
    with urllib.request.urlopen(f"{served['http'].url}/metrics", timeout=30) as r:
        metrics = r.read().decode()
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    values = {
        line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if not line.startswith("#")
    }
    for name in ("hits", "misses", "prefetch_hits", "bytes_read", "stall_seconds", "reading_seconds"):
        assert f"moeflow_cache_{name}_total" in values
    assert values["moeflow_cache_bytes_read_total"] > 0 and values["moeflow_cache_reading_seconds_total"] > 0
    assert values["moeflow_generated_tokens_total"] >= 12
    assert values["moeflow_requests_completed_total"] >= 1


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl(served):
    url = served["http"].url

    def curl(*args: str) -> str:
        out = subprocess.run(["curl", "-sS", "--max-time", "60", *args], capture_output=True, text=True, check=True)
        return out.stdout

    assert json.loads(curl(f"{url}/health")) == {"status": "ok"}
    assert json.loads(curl(f"{url}/v1/models"))["data"][0]["id"] == "tiny-qwen3"
    body = json.dumps({"model": "m", "prompt": PROMPT, "max_tokens": 12, "stream": True})
    events = curl("-N", f"{url}/v1/completions", "-H", "Content-Type: application/json", "-d", body)
    lines = [ln for ln in events.split("\n\n") if ln]
    assert lines[-1] == "data: [DONE]"
    text = "".join(json.loads(ln.removeprefix("data: "))["choices"][0]["text"] for ln in lines[:-1])
    assert text == served["expected"]["completion"].text
    err = curl("-w", "\n%{http_code}", f"{url}/v1/completions", "-d", json.dumps({"prompt": PROMPT, "top_p": 0}))
    body, code = err.rsplit("\n", 1)
    assert code == "400" and "top_p must be in (0, 1]" in json.loads(body)["error"]["message"]


@pytest.mark.slow
def test_moeflow_serve_http_port(tiny_checkpoints):
    """`moeflow serve --http-port 0` serves the HTTP API beside gRPC, says where, and drains on SIGTERM."""
    import signal
    import sys

    cmd = [sys.executable, "-m", "moeflow.cli", "serve", "--model", str(tiny_checkpoints["qwen3_moe"]),
           "--port", "0", "--http-port", "0"]  # fmt: skip
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:
            if "OpenAI-compatible HTTP API on " in line:
                base = line.rsplit(" on ", 1)[1].strip()
                break
        else:
            pytest.fail(f"no HTTP address printed; exit {proc.wait()}")
        assert base.startswith("http://127.0.0.1:")  # loopback by default
        status, body = _post(f"{base}/completions", {"prompt": PROMPT, "max_tokens": 4})
        assert status == 200 and body["usage"]["completion_tokens"] == 4
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_concurrent_requests_with_different_settings(served):
    """Requests decoding together keep their own sampling settings and get what they get alone."""
    from concurrent.futures import ThreadPoolExecutor

    client, expected = served["client"], served["expected"]
    plain = {"prompt": PROMPT, "max_tokens": 12}
    penalised = {**plain, "extra_body": {"repetition_penalty": 1.5, "top_k": 3}}
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(client.completions.create, model="m", **kw) for kw in [plain, penalised] * 3]
        texts = [f.result().choices[0].text for f in futures]
    assert texts == [expected["completion"].text, expected["penalised"].text] * 3


def test_draining_server_answers_503(tiny_checkpoints):
    with moeflow.load(tiny_checkpoints["mixtral"]) as engine:
        running = start(engine, ServerConfig(port=0), model_name="m")
        http = start_http(running.worker, ServerConfig(http_port=0), model_name="m")
        try:
            running.worker.drain()
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(f"{http.url}/health", timeout=30)
            assert e.value.code == 503
            status, body = _post(f"{http.url}/v1/completions", {"prompt": "abc", "max_tokens": 2})
            assert status == 503 and "shutting down" in body["error"]["message"]
        finally:
            http.shutdown()
            running.shutdown(5)


def test_streamed_characters_split_over_tokens(tmp_path):
    """Server-sent text deltas add up to the non-streamed text when tokens end inside UTF-8 characters."""
    from moeflow.config import DEFAULT_MODEL
    from moeflow.testing import save_tiny_checkpoint

    path = save_tiny_checkpoint("mixtral", tmp_path / "m", vocab=4096)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEFAULT_MODEL / name, path / name)
    with moeflow.load(path) as engine:
        want = engine.generate("héllo 🦊", max_new_tokens=48, temperature=1.0, seed=1)
        assert any(engine.tokenizer.decode([t]).endswith("\ufffd") for t in want.token_ids)
        running = start(engine, ServerConfig(port=0), model_name="m")
        http = start_http(running.worker, ServerConfig(http_port=0), model_name="m")
        try:
            client = openai.OpenAI(base_url=f"{http.url}/v1", api_key="unused", max_retries=0, timeout=60)
            kw = {"model": "m", "prompt": "héllo 🦊", "max_tokens": 48, "temperature": 1.0, "seed": 1}
            pieces = [c.choices[0].text for c in client.completions.create(stream=True, **kw)]
            assert "".join(pieces) == want.text == client.completions.create(**kw).choices[0].text
        finally:
            http.shutdown()
            running.shutdown(5)
