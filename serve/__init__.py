"""gRPC serving: the `moeflow.v1` API over an engine thread that runs continuous batching.

Layout, along the data path:
- `proto/moeflow/v1/moeflow.proto` — the versioned API (modules generated at import, `serve.proto`);
- `servicer.py` — protobuf <-> dataclasses, status codes; nothing else;
- `worker.py` — the engine thread that owns the scheduler; limits, cancellation, stats;
- `detok.py` — streamed text increments;
- `server.py` — gRPC server with health and reflection, SIGTERM drain (`moeflow serve`);
- `client.py` — `MoeflowClient` (`moeflow client`).

Importing `serve` or `serve.client` does not import torch.
"""
