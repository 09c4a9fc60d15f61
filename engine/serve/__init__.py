"""Serving the engine on Ray Serve: HTTP API (app.py), request format (api.py), browser demo (demo.py).

`python -m engine.serve --model tiny` starts it locally; see docs/SERVING.md. Nothing is imported here,
so `import engine.serve.api` works without Ray installed.
"""
