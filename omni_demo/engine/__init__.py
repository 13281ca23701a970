"""The streaming engine over a loaded model: `omni_engine.OmniEngine` runs one reply (thinker and
talker in lock-step, Token2Wav chunk by chunk), on the decoders, decode steps, sampling and the
conversation cache beside it; `listening` prefills a spoken turn while it arrives."""
