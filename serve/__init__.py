"""gRPC serving: the `moeflow.v1` API over an engine thread that runs continuous batching.

Layout, along the data path:
- `proto/moeflow/v1/moeflow.proto` — the versioned API (modules generated at import, `serve.proto`);
- `servicer.py` — protobuf <-> dataclasses, status codes; nothing else;
- `worker.py` — the engine thread that owns the scheduler and drives it;
- `intake.py` — request limits, and admission under the server's capacity (handler threads -> engine thread);
- `handle.py` — one request's events from the engine thread, turned into `Chunk`s on its handler thread;
- `stats.py` — the running totals behind `GetStats`;
- `errors.py` — refusals and failures that are not the request's fault;
- `guard.py` — no client can take every handler thread: per-class call limits and pools, the idle deadline, the token;
- `server.py` — gRPC server with health and reflection, TLS, SIGTERM drain (`moeflow serve`);
- `http.py` — the OpenAI-compatible HTTP API on the same worker (`moeflow serve --http-port`), Starlette on uvicorn;
- `openai_api.py` — OpenAI request JSON <-> `GenerateRequest`, `Chunk`s -> OpenAI response and stream objects;
- `metrics.py` — `/metrics`: the stats in Prometheus text format;
- `client.py` — `MoeflowClient` (`moeflow client`).

Importing `serve` or `serve.client` does not import torch.
"""
