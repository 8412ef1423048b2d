"""`moeflow` command line. Engine options are generated from `EngineConfig`, so defaults live there."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from .engine import DEFAULT_MODEL, EngineConfig, load, peak_rss_bytes
from .errors import MoeflowError
from .sampling import SamplingParams


def add_dataclass_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """One `--kebab-name` option per dataclass field, with the field's default and help."""
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "") + f" (default: {f.default})"
        if f.type in (bool, "bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        else:
            kind = {"int": int, "float": float, "int | None": int}.get(str(f.type), str)
            parser.add_argument(flag, type=kind, default=f.default, help=help_text)


def dataclass_from_args(cls: type, args: argparse.Namespace) -> object:
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def _model_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", type=Path, default=None, help=f"Hugging Face model folder (default: {DEFAULT_MODEL.name}, shipped)"
    )


def cmd_generate(args: argparse.Namespace) -> int:
    config = dataclass_from_args(EngineConfig, args)
    sampling = dataclass_from_args(SamplingParams, args)
    with load(args.model, **dataclasses.asdict(config)) as engine:
        result = engine.generate(args.prompt, **dataclasses.asdict(sampling))
        stats = engine.stats()
    if args.json:
        print(
            json.dumps(
                {
                    "text": result.text,
                    "token_ids": result.token_ids,
                    "prompt_token_ids": result.prompt_token_ids,
                    "finish_reason": result.finish_reason,
                    "tokens_per_s": result.tokens_per_s,
                    "prefill_s": result.prefill_s,
                    "elapsed_s": result.elapsed_s,
                    "peak_rss_bytes": peak_rss_bytes(),
                    "cache": stats.to_dict(),
                }
            )
        )
    else:
        print(args.prompt + (result.text if result.text is not None else str(result.token_ids)))
        print(
            f"[{len(result.token_ids)} tokens, {result.tokens_per_s:.1f} tok/s, cache hit rate "
            f"{stats.hit_rate:.1%}, {stats.bytes_read / 2**20:.1f} MiB read, "
            f"{stats.capacity_slots} expert slots ({stats.capacity_slots * stats.slot_bytes / 2**20:.1f} MiB "
            f"of {stats.budget_bytes / 2**20:.1f} MiB budget)]",
            file=sys.stderr,
        )
    return 0


def default_data_files() -> list[Path]:
    """The shipped model's held-out corpus files: what measurements use when --data is omitted."""
    from training.corpus import corpus_files

    return corpus_files("heldout")


def _data_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", type=Path, nargs="+", default=None, help="text files (default: the held-out corpus files)"
    )


def cmd_trace(args: argparse.Namespace) -> int:
    from .trace import record_trace

    with load(args.model, expert_budget="all", store="ram") as engine:
        trace = record_trace(
            engine, args.data or default_data_files(), context=args.context, max_tokens=args.max_tokens
        )
    trace.save(args.out)
    print(f"wrote {trace.num_tokens} tokens x {len(trace.layers)} MoE layers to {args.out}", file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from serve.config import ServerConfig
    from serve.server import run

    return run(args.model, dataclass_from_args(EngineConfig, args), dataclass_from_args(ServerConfig, args))


def cmd_client(args: argparse.Namespace) -> int:
    from serve.client import run_cli

    if args.prompt is None and not args.stats:
        raise MoeflowError("give --prompt TEXT to generate, or --stats to print the server's statistics")
    sampling = dataclasses.asdict(dataclass_from_args(SamplingParams, args))
    return run_cli(
        f"{args.host}:{args.port}",
        args.prompt,
        sampling=sampling,
        unary=args.unary,
        as_json=args.json,
        show_stats=args.stats,
        timeout=args.timeout,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moeflow", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text with the experts offloaded")
    _model_option(gen)
    gen.add_argument("--prompt", required=True, help="prompt text")
    gen.add_argument("--json", action="store_true", help="print one JSON object with text, speed and cache stats")
    add_dataclass_options(gen, SamplingParams)
    add_dataclass_options(gen, EngineConfig)
    gen.set_defaults(func=cmd_generate)

    trace = sub.add_parser("trace", help="record every token's routing over text files (numpy folder)")
    _model_option(trace)
    _data_option(trace)
    trace.add_argument("--out", type=Path, required=True, help="output folder")
    trace.add_argument("--context", type=int, default=256, help="tokens per forward (chunk length)")
    trace.add_argument("--max-tokens", type=int, default=None, help="stop after this many tokens")
    trace.set_defaults(func=cmd_trace)

    from serve.config import ServerConfig

    srv = sub.add_parser("serve", help="serve the model over gRPC (moeflow.v1, health, reflection); SIGTERM drains")
    _model_option(srv)
    add_dataclass_options(srv, ServerConfig)
    add_dataclass_options(srv, EngineConfig)
    srv.set_defaults(func=cmd_serve)

    client = sub.add_parser("client", help="send a prompt to `moeflow serve` and stream the reply")
    client.add_argument("--host", default="127.0.0.1", help="server address (default: 127.0.0.1)")
    client.add_argument(
        "--port", type=int, default=ServerConfig.port, help=f"server port (default: {ServerConfig.port})"
    )
    client.add_argument("--prompt", default=None, help="prompt text")
    client.add_argument("--unary", action="store_true", help="one reply with the whole text instead of a stream")
    client.add_argument("--json", action="store_true", help="print each reply message as one JSON line")
    client.add_argument("--stats", action="store_true", help="print the server's statistics (JSON)")
    client.add_argument("--timeout", type=float, default=None, help="deadline of each call, in seconds")
    add_dataclass_options(client, SamplingParams)
    client.set_defaults(func=cmd_client)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except MoeflowError as e:
        print(f"moeflow: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
