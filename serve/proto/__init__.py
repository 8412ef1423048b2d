"""The `moeflow.v1` protobuf API, generated from `moeflow/v1/moeflow.proto` when first imported.

Generating at import (grpc_tools is a dependency) keeps the message and stub code in step with the
installed protobuf and grpcio; committed gencode would pin the exact runtime versions it came from.
"""

from __future__ import annotations

import sys
from pathlib import Path

import grpc

PROTO_FILE = "serve/proto/moeflow/v1/moeflow.proto"  # relative to the folder that holds `serve/`
_ROOT = str(Path(__file__).resolve().parents[2])


def _generate() -> tuple[object, object]:
    """protoc (in process) resolves PROTO_FILE against sys.path; make sure our own copy is on it."""
    added = _ROOT not in sys.path
    if added:
        sys.path.append(_ROOT)
    try:
        return grpc.protos_and_services(PROTO_FILE)
    finally:
        if added:
            sys.path.remove(_ROOT)


moeflow_pb2, moeflow_pb2_grpc = _generate()
SERVICE_NAME: str = moeflow_pb2.DESCRIPTOR.services_by_name["Moeflow"].full_name  # "moeflow.v1.Moeflow"

__all__ = ["PROTO_FILE", "SERVICE_NAME", "moeflow_pb2", "moeflow_pb2_grpc"]
