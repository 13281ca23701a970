"""Hostile input to `python -m omni_demo.serve`, as a review found it: bodies that used to be a 500,
seeds out of range, slow senders, and one client reading another's prompt from the cache. Each is
answered in kind (400 naming the field, 429, 200), and the server keeps serving."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest

from omni_demo.config import DEFAULT_SYSTEM_PROMPT

from .serverhelpers import API_KEY, ApiServer

openai = pytest.importorskip("openai")

GOOD = b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}'
HOSTILE = {  # the body, and the field its 400 must name (None: the body as a whole)
    "lone surrogate in text": (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi \\ud800"}]}',
                               "messages[0].content"),
    "lone surrogate in a field name": (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], '
                                       b'"\\udc00x": 1}', "(top level)"),
    "deeply nested JSON": (b'{"model": "tiny", "messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", None),
    "a 5,000-digit integer": (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1'
                              + b"0" * 5000 + b"}", None),
    "NUL in a data URL's media type": (b'{"model": "tiny", "messages": [{"role": "user", "content": [{"type": '
                                       b'"image_url", "image_url": {"url": "data:image/pn\\u0000g;base64,AAAA"}}]}]}',
                                       "messages[0].content[0].image_url.url"),
    "a list as a modality": (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], '
                             b'"modalities": [["text"]]}', "modalities"),
    "an object as a part's type": (b'{"model": "tiny", "messages": [{"role": "user", "content": [{"type": {}}]}]}',
                                   "messages[0].content[0].type"),
    "n: true": (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": true}', "n"),
    "include_usage as a string": (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], '
                                  b'"stream_options": {"include_usage": "false"}}', "stream_options.include_usage"),
    "seed below 0": (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "seed": -1}', "seed"),
    "seed above 2**32 - 1": (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], '
                             b'"seed": 4294967296}', "seed"),
}


def test_hostile_bodies_are_400s_naming_the_field_on_a_connection_that_goes_on(api_server):
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    with httpx.Client(base_url=api_server.base_url, headers=headers, timeout=30) as http:
        for name, (body, param) in HOSTILE.items():
            response = http.post("/chat/completions", content=body)
            error = response.json()["error"]
            assert response.status_code == 400, (name, response.status_code, error)
            assert error["type"] == "invalid_request_error", name
            if param is not None:
                assert error["param"] == param, (name, error)
        done = http.post("/chat/completions", content=GOOD)  # the same connection, still served
        assert done.status_code == 200 and done.json()["choices"][0]["message"]["content"] is not None
    assert "Traceback" not in api_server.output()


@pytest.mark.parametrize("fields", [{"temperature": 2}, {"repetition_penalty": 2}, {"temperature": 1e-300},
                                    {"repetition_penalty": 1e-300, "temperature": 1}])
def test_sampling_values_the_checks_take_are_served(api_server, fields):
    """Whole numbers (transformers' warpers take floats only) and values so small that logits
    overflow used to be 500s after the checks had taken them."""
    client = openai.OpenAI(base_url=api_server.base_url, api_key=API_KEY, max_retries=0)
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                           seed=1, extra_body=fields)
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_the_seed_range_is_the_engines(api_server):
    client = openai.OpenAI(base_url=api_server.base_url, api_key=API_KEY, max_retries=0)
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=2, seed=2**32 - 1)
    assert reply.choices[0].finish_reason in ("stop", "length")


@pytest.fixture(scope="module")
def patient_server(tiny_dir):
    """Uploads may take 30 s (the fixture's usual server allows 2), one waiting reply at most, two
    API keys: two parties."""
    server = ApiServer("--api-key", f"{API_KEY},other-key", "--max-queue", "1", "--upload-timeout-s", "30",
                       "--max-uploads-per-client", "24").wait()
    yield server
    server.stop()


class Tricklers:
    """`count` clients sending a chat request's body at one byte a second."""

    def __init__(self, port: int, count: int):
        self.sockets, self.stop = [], threading.Event()
        for _ in range(count):
            connection = socket.create_connection(("127.0.0.1", port), timeout=30)
            connection.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
                               "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n".encode())
            self.sockets.append(connection)
        self.thread = threading.Thread(target=self._trickle, daemon=True)
        self.thread.start()

    def _trickle(self):
        while not self.stop.wait(1.0):
            for connection in self.sockets:
                try:
                    connection.sendall(b" ")
                except OSError:
                    pass

    def close(self):
        self.stop.set()
        self.thread.join(5)
        for connection in self.sockets:
            connection.close()


def test_slow_senders_hold_no_place_in_the_queue(patient_server):
    tricklers = Tricklers(patient_server.port, 17)
    try:
        time.sleep(1.5)  # every trickler has begun its body
        client = openai.OpenAI(base_url=patient_server.base_url, api_key=API_KEY, max_retries=0, timeout=20)
        for _ in range(3):  # --max-queue 1 would refuse the first of these, were the tricklers in line
            reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                   max_tokens=2)
            assert reply.choices[0].finish_reason in ("stop", "length")
        health = patient_server.health()
        assert health["waiting"] == 0 and health["running"] == 0, health  # /health counts no trickler
        more = Tricklers(patient_server.port, 8)  # 25 from this address: the 25th is refused at once
        try:
            answer = b""
            while b"too_many_uploads" not in answer and (received := more.sockets[-1].recv(4096)):
                answer += received
            assert answer.startswith(b"HTTP/1.1 429") and b"too_many_uploads" in answer, answer
        finally:
            more.close()
    finally:
        tricklers.close()


SECRET = "My card PIN is 315757. Keep it safe for me."


def cached_tokens(server, key: str, salt: str | None, text: str, history=()) -> tuple[int, str]:
    client = openai.OpenAI(base_url=server.base_url, api_key=key, max_retries=0)
    messages = [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, *history, {"role": "user", "content": text}]
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, temperature=0,
                                           extra_body={"cache_salt": salt} if salt else None)
    return reply.usage.prompt_tokens_details.cached_tokens, reply.choices[0].message.content or "…"


@pytest.mark.parametrize(("victim", "attacker"), [
    ((API_KEY, None), (API_KEY, None)),  # one key, no salt: each guess is a whole new prompt
    ((API_KEY, None), ("other-key", None)),  # another key: another party
    ((API_KEY, "alice"), (API_KEY, "mallory")),  # one key, two salts
], ids=["same key", "other key", "other salt"])
def test_another_client_cannot_read_a_prompt_from_cached_tokens(patient_server, victim, attacker):
    _, reply = cached_tokens(patient_server, *victim, SECRET)
    history = [{"role": "user", "content": SECRET}, {"role": "assistant", "content": reply}]
    later, _ = cached_tokens(patient_server, *victim, "What is my PIN?", history=history)
    assert later > 20, "the victim's own later turn comes from the cache"
    key, salt = attacker
    salts = (None if salt is None else f"{salt}-{n}" for n in range(100))  # a salted attacker's own earlier
    known = "My card PIN is "  # guesses are its own cache: it asks each one under a new salt
    for _ in range(3):
        right = known + SECRET[len(known)]
        wrong = known + str((int(SECRET[len(known)]) + 5) % 10)
        seen = {guess: cached_tokens(patient_server, key, next(salts), guess)[0] for guess in (wrong, right)}
        assert seen[right] == seen[wrong] == 0, seen
        known = right
    if victim[0] != attacker[0]:  # another key's flood of guesses evicts its own entries, not the victim's
        again, _ = cached_tokens(patient_server, *victim, "And my name?", history=history)
        assert again > 20, "the victim's later turns still come from the cache"
