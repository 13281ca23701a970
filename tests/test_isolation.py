"""No user can reach another through the conversation cache: a party reuses its own prefixes, and
another party's prompt, guessed digit by digit, answers every guess alike (in the usage figures and
in the work done before the first token, so in time); the party's own later turns still hit."""

from dataclasses import replace

import pytest

from omni_demo.config import DEFAULT_SYSTEM_PROMPT, CacheScope, GenerationOptions
from omni_demo.engine.omni_engine import OmniEngine
from omni_demo.events import Finished
from omni_demo.inputs.messages import system_message

SECRET = "My card PIN is 315757. Keep it safe for me."
TEXT = GenerationOptions(speech=False, greedy=True, max_new_tokens=6, min_new_tokens=6)
SESSION_A = CacheScope("session:a", private=True)
SESSION_B = CacheScope("session:b", private=True)
SHARED = CacheScope("api:one-key", private=False)  # two clients holding the same API key, no cache_salt


def ask(engine, text: str, scope: CacheScope, history=()) -> tuple[Finished, int]:
    """(the reply's Finished, prompt tokens actually taken from the cache: what the prefill skipped)."""
    taken = []
    longest = engine.conversation_cache.longest

    def spy(*args, **kwargs):
        reuse = longest(*args, **kwargs)
        taken.append(reuse.length)
        return reuse

    engine.conversation_cache.longest = spy
    try:
        messages = [system_message(DEFAULT_SYSTEM_PROMPT), *history, {"role": "user", "content": text}]
        events = list(engine.stream(messages, replace(TEXT, cache_scope=scope)))
    finally:
        del engine.conversation_cache.longest
    return events[-1], taken[-1]


def guesses(prefix: str) -> tuple[str, str]:
    """The next digit guessed right, and guessed wrong."""
    right = SECRET[len(prefix)]
    return prefix + right, prefix + str((int(right) + 5) % 10)


@pytest.mark.parametrize("shared", [False, True], ids=["browser sessions", "one API key, no salt"])
def test_a_secret_cannot_be_guessed_digit_by_digit_from_the_cache(loaded, shared):
    """The attacker asks with a new session per guess (its own earlier guesses are its own cache), or,
    holding the victim's API key, as the victim's own party."""
    engine = OmniEngine(loaded)
    public = len(engine.conversation_cache.public_ids)
    ask(engine, SECRET, SHARED if shared else SESSION_A)
    attackers = (SHARED if shared else CacheScope(f"session:b{n}", private=True) for n in range(100))
    known = "My card PIN is "
    for _ in range(3):
        (right, right_taken), (wrong, wrong_taken) = [ask(engine, guess, next(attackers)) for guess in guesses(known)]
        assert right_taken == wrong_taken == public, "the right digit must not save any more work than a wrong one"
        assert right.stats.reused_prompt_tokens == wrong.stats.reused_prompt_tokens == 0  # cached_tokens
        known += SECRET[len(known)]


@pytest.mark.parametrize("scope", [SESSION_A, SHARED], ids=["browser session", "API key"])
def test_a_partys_own_later_turns_still_come_from_the_cache(loaded, scope):
    engine = OmniEngine(loaded)
    first, _ = ask(engine, SECRET, scope)
    history = [{"role": "user", "content": SECRET}, {"role": "assistant", "content": first.text}]
    later, taken = ask(engine, "What is my PIN?", scope, history)
    if scope.private:  # the whole first turn, its reply included
        assert taken == later.stats.reused_prompt_tokens > first.stats.prompt_tokens
    else:  # through the first prompt, never into a reply another client of the key might not know
        assert taken == later.stats.reused_prompt_tokens == first.stats.prompt_tokens - 1
    other, taken = ask(engine, "What is my PIN?", SESSION_B if scope is SESSION_A else SESSION_A, history)
    assert other.stats.reused_prompt_tokens == 0 and taken == len(engine.conversation_cache.public_ids)


def test_a_private_party_reuses_its_own_prompt_as_far_as_it_agrees(loaded):
    """An edited message (edit-and-resend in the page) still reuses what it shares with the first."""
    engine = OmniEngine(loaded)
    ask(engine, SECRET, SESSION_A)
    edited, taken = ask(engine, SECRET.replace("315757", "999999"), SESSION_A)
    assert taken == edited.stats.reused_prompt_tokens > len(engine.conversation_cache.public_ids)


def test_media_another_party_sent_is_processed_again(loaded, monkeypatch):
    from omni_demo.inputs import prepare

    from .conftest import ASSETS

    engine, processed = OmniEngine(loaded), []
    original = prepare.process_media
    monkeypatch.setattr(prepare, "process_media", lambda *a, **k: processed.append(a[1]) or original(*a, **k))
    picture = [{"type": "image", "image": str(ASSETS / "shapes.png")}, {"type": "text", "text": "What is it?"}]
    for scope in (SESSION_A, SESSION_A, SESSION_B):
        list(engine.stream([{"role": "user", "content": picture}], replace(TEXT, cache_scope=scope)))
    assert processed == ["image", "image"]  # once for a (its second turn reuses it), once for b


def test_a_whole_prompt_guessed_does_not_read_the_reply_another_client_got(loaded):
    """One API key, no salt: a client that guesses another's whole message learns nothing more of the
    reply that client was given, token by token (the reuse stops where the prompt ends)."""
    engine = OmniEngine(loaded)
    first, _ = ask(engine, SECRET, SHARED)
    reply = engine.processor.tokenizer(first.text)["input_ids"]
    assert len(reply) >= 2
    history = [{"role": "user", "content": SECRET}]
    taken = []
    for guess in (first.text[: len(first.text) // 2], "zz" + first.text):  # half of its reply, a wrong one
        taken.append(ask(engine, "And?", SHARED, [*history, {"role": "assistant", "content": guess}])[1])
    assert taken[0] == taken[1] == first.stats.prompt_tokens - 1
