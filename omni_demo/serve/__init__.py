"""The OpenAI-compatible HTTP server (`python -m omni_demo.serve`): the Starlette app (http.py),
the protocol's requests and chunks (openai_protocol.py), the reply worker, its flags, Ray Serve."""
