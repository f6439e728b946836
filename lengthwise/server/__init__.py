"""The OpenAI-compatible HTTP server (`lengthwise serve`): `api_server.build_app` over an
`AsyncEngine`, with Prometheus metrics (`metrics.py`) and OpenAI's request and error bodies
(`protocol.py`)."""
