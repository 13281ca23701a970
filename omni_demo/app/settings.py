"""The settings panel's values, checked as every setting is (finite, in range, whole where it must
be) in the page, `/chat` and the voice call, and turned into a request's options."""

from __future__ import annotations

import math
from dataclasses import replace

from omni_demo.call.turns import HYSTERESIS
from omni_demo.call.voice_call import CallConfig
from omni_demo.config import MAX_SEED, SAMPLE_RATE, SAMPLES_PER_CODE, GenerationOptions
from omni_demo.errors import InputError

CODES_PER_SECOND = SAMPLE_RATE // SAMPLES_PER_CODE  # 50 talker codes per second of speech
# The settings a request may send, as (low, high, whole number); the sliders show the same ranges.
SETTING_RANGES = {"temperature": (0.05, 1.5, False), "top_p": (0.05, 1.0, False), "max_new_tokens": (16, 2048, True),
                  "max_speech_s": (5, 80, False), "seed": (0, MAX_SEED, True), "call_pause": (0.2, 3.0, False),
                  "call_sensitivity": (0.1, 0.8, False)}


def setting(name: str, value) -> int | float:
    """A numeric setting, checked: a finite number in its range (whole where it must be)."""
    low, high, whole = SETTING_RANGES[name]
    label = name.replace("_", " ")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{label} must be a number, not {value!r:.40}")
    if not (math.isfinite(value) and low <= value <= high):
        raise InputError(f"{label} must be between {low:g} and {high:g}, not {value!r:.40}")
    if whole and value != int(value):
        raise InputError(f"{label} must be a whole number, not {value!r:.40}")
    return int(value) if whole else float(value)


def reply_options(voice, speech, temperature, top_p, max_new_tokens, max_speech_s, use_audio_in_video,
                  seed) -> GenerationOptions:
    """The settings panel's values as a request's options; InputError names a value out of range."""
    if not isinstance(voice, str):
        raise InputError(f"voice must be a name, not {voice!r:.40}")
    try:
        return GenerationOptions(
            voice=voice, speech=bool(speech), temperature=setting("temperature", temperature),
            top_p=setting("top_p", top_p), max_new_tokens=setting("max_new_tokens", max_new_tokens),
            max_audio_tokens=max(1, round(setting("max_speech_s", max_speech_s) * CODES_PER_SECOND)),
            use_audio_in_video=bool(use_audio_in_video), seed=setting("seed", 0 if seed is None else seed) or None,
        )
    except ValueError as exc:
        raise InputError(f"invalid setting: {exc}") from exc


def system_text(system_prompt) -> str:
    """The system prompt as sent (None, from the API: none)."""
    if system_prompt is None:
        return ""
    if not isinstance(system_prompt, str):
        raise InputError(f"the system prompt must be text, not {type(system_prompt).__name__}")
    return system_prompt.strip()


def call_config(pause_s, sensitivity, base: CallConfig) -> CallConfig:
    """The call settings as a CallConfig. Sensitivity is 1 - the VAD's speech threshold."""
    pause_s, sensitivity = setting("call_pause", pause_s), setting("call_sensitivity", sensitivity)
    threshold = max(1.0 - sensitivity, HYSTERESIS + 0.05)
    turns = replace(base.turns, pause_s=pause_s, threshold=threshold,
                    playing_threshold=max(base.turns.playing_threshold, threshold))
    return replace(base, turns=turns)
