"""The voice call, below any page: the call's loop (voice_call.py), its events, the microphone
stream, the turn detector and the replies it holds; vad.py is the one module with torch."""
