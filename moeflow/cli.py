"""`moeflow` command line. Options are generated from the config dataclasses, so defaults live there.

Start-up is cheap on purpose: this module imports only torch-free modules; each subcommand imports the
engine (torch, transformers) when it runs, so `moeflow --help` and `moeflow client` never pay for them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from moeflow.config import Admission, EngineConfig, ProfileConfig, SamplingParams, choices
from moeflow.errors import MoeflowError
from moeflow.options import add_options, options_from_args
from moeflow.serve.config import ServerConfig

if TYPE_CHECKING:
    from moeflow.offload.stats import CacheStats

_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}
# The sampling fields the gRPC API (moeflow.v1.GenerateRequest) carries; the HTTP API carries them all.
GRPC_SAMPLING = ("max_new_tokens", "temperature", "top_p", "seed")


def unescape(text: str) -> str:
    """`\\n`, `\\t` and `\\\\` stand for newline, tab and one backslash (in --prompt and in prompts files)."""
    return re.sub(r"\\([nt\\])", lambda m: _ESCAPES[m[1]], text)


def _model_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", type=Path, default=None, help="Hugging Face model folder (default: the shipped default model)"
    )


def read_prompts(path: Path) -> list[str]:
    """One prompt per non-empty line, escapes as in `unescape`."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise MoeflowError(f"cannot read prompts from {path} ({e}); give a UTF-8 text file, one prompt per line") from e
    prompts = [unescape(ln) for ln in lines if ln.strip()]
    if not prompts:
        raise MoeflowError(f"{path} holds no prompts; write one prompt per line")
    return prompts



def reads_line(stats: CacheStats) -> str:
    """What offloading cost: bytes read from the backing store (at what rate while reading), the time compute waited
    for them, and the reads a prefetch did ahead of their layer that the layer then used (their wait hidden behind
    compute)."""
    rate = "" if stats.read_gib_s is None else f" at {stats.read_gib_s:.2f} GiB/s"
    ahead = f", {stats.prefetch_hits} read ahead and used" if stats.prefetch_hits else ""
    return f"{stats.bytes_read / 2**20:.1f} MiB read{rate}, {stats.stall_s:.2f} s waiting on reads{ahead}"

def cmd_generate_batch(args: argparse.Namespace) -> int:
    from moeflow.build import load, make_admission
    from moeflow.engine import peak_rss_bytes
    from moeflow.scheduler import run_batch

    if args.batch_size < 1:
        raise MoeflowError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.rebatch_pool is not None and args.admission != "rebatch":
        raise MoeflowError("--rebatch-pool sizes the re-batcher's pool; use it with --admission rebatch")
    if args.rebatch_pool is not None and args.rebatch_pool < 1:
        raise MoeflowError(f"--rebatch-pool must be at least 1 (batches the pool holds), got {args.rebatch_pool}")
    prompts = read_prompts(args.prompts)
    config = options_from_args(EngineConfig, args)
    sampling = options_from_args(SamplingParams, args)
    with load(args.model, **dataclasses.asdict(config)) as engine:
        pool = {} if args.rebatch_pool is None else {"pool_factor": args.rebatch_pool}
        admission = make_admission(args.admission, engine, **pool)
        run = run_batch(
            engine, prompts, batch_size=args.batch_size, admission=admission, **dataclasses.asdict(sampling)
        )
        stats = engine.stats()
    results = run.results
    tokens = sum(len(r.token_ids) for r in results)
    summary = {
        "prompts": len(results),
        "tokens": tokens,
        "elapsed_s": run.elapsed_s,
        "tokens_per_s": tokens / run.elapsed_s if run.elapsed_s > 0 else 0.0,
        "admission": args.admission,
        "batch_size": args.batch_size,
        "mean_batch": float(sum(run.batch_sizes) / max(len(run.batch_sizes), 1)),
        "distinct_experts_per_step": float(sum(run.distinct_experts) / max(len(run.distinct_experts), 1)),
        "peak_rss_bytes": peak_rss_bytes(),
        "cache": stats.to_dict(),
    }
    if args.json:
        for r in results:
            print(json.dumps({"text": r.text, "token_ids": r.token_ids, "finish_reason": r.finish_reason}))
        print(json.dumps(summary))
    else:
        for p, r in zip(prompts, results):
            print(p + (r.text if r.text is not None else str(r.token_ids)))
            print("-" * 40)
        print(
            f"[{len(results)} prompts, {tokens} tokens, {summary['tokens_per_s']:.1f} tok/s, "
            f"{summary['distinct_experts_per_step']:.2f} distinct experts per layer per step, "
            f"cache hit rate {stats.hit_rate:.1%}, {reads_line(stats)}]",
            file=sys.stderr,
        )
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    if args.prompts is not None:
        return cmd_generate_batch(args)
    from dataclasses import asdict

    from moeflow.build import load
    from moeflow.engine import peak_rss_bytes

    prompt = unescape(args.prompt)
    config = options_from_args(EngineConfig, args)
    sampling = options_from_args(SamplingParams, args)
    with load(args.model, **dataclasses.asdict(config)) as engine:
        run = engine.stream(prompt, **dataclasses.asdict(sampling))
        if not args.json:  # the text goes to stdout as it is generated
            print(prompt, end="", flush=True)
        for piece in run:
            if not args.json:
                print(piece, end="", flush=True)
        result = run.result
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
                    **({} if result.logprobs is None else {"logprobs": [asdict(lp) for lp in result.logprobs]}),
                }
            )
        )
    else:
        print("" if result.text is not None else str(result.token_ids))  # ends the streamed line
        print(
            f"[{len(result.token_ids)} tokens, {result.tokens_per_s:.1f} tok/s, cache hit rate "
            f"{stats.hit_rate:.1%}, {reads_line(stats)}, "
            f"{stats.capacity_slots} expert slots ({stats.capacity_slots * stats.slot_bytes / 2**20:.1f} MiB "
            f"of {stats.budget_bytes / 2**20:.1f} MiB budget)]",
            file=sys.stderr,
        )
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from moeflow.build import load
    from moeflow.engine.chat import ChatSession, chat_prompt
    from moeflow.errors import RequestError

    config = options_from_args(EngineConfig, args)
    sampling = {k: v for k, v in dataclasses.asdict(options_from_args(SamplingParams, args)).items() if v is not None}
    interactive = sys.stdin.isatty()
    with load(args.model, **dataclasses.asdict(config)) as engine:
        session = ChatSession(engine, system=args.system and unescape(args.system), **sampling)
        template = chat_prompt(engine.tokenizer, [{"role": "user", "content": ""}]).template
        if interactive:
            how = "its chat template" if template == "model" else "a plain role: content transcript (no chat template)"
            print(f"[chat with {engine.checkpoint.path.name}, {how}; Ctrl-D ends]", file=sys.stderr)
        while True:
            if interactive:
                print("> ", end="", file=sys.stderr, flush=True)
            line = sys.stdin.readline()
            if not line:
                break
            text = unescape(line.rstrip("\n"))
            if not text.strip():
                continue
            try:
                for piece in session.reply(text):
                    print(piece, end="", flush=True)
            except RequestError as e:  # this turn is refused (too long for the context...); the chat goes on
                print(f"moeflow: error: {e}", file=sys.stderr)
                continue
            print()
            last = session.last
            print(f"[{len(last.token_ids)} tokens, {last.tokens_per_s:.1f} tok/s]", file=sys.stderr, flush=True)
    return 0


def default_data_files() -> list[Path]:
    """The shipped model's held-out corpus files: what measurements use when --data is omitted."""
    from moeflow.engine import DEFAULT_MODEL
    from moeflow.model.corpus import model_corpus

    return model_corpus(DEFAULT_MODEL, "heldout")


def _data_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", type=Path, nargs="+", default=None, help="text files (default: the held-out corpus files)"
    )


def _predictor_dir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--predictor-dir",
        type=Path,
        default=None,
        help="folder of trained predictors, as `moeflow predictor train --out` wrote it (default: MODEL/predictors)",
    )


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def cmd_trace(args: argparse.Namespace) -> int:
    from moeflow.build import load
    from moeflow.tools.trace import record_trace

    with load(args.model, expert_budget="all", store="ram", predictor_dir=args.predictor_dir) as engine:
        predictors = []
        if args.predictors:
            from moeflow.predictor.apply import build_predictor

            predictors = [build_predictor(engine, n, lookahead=args.lookahead) for n in _names(args.predictors)]
        trace = record_trace(
            engine,
            args.data or default_data_files(),
            context=args.context,
            max_tokens=args.max_tokens,
            predictors=predictors,
        )
    trace.save(args.out)
    print(f"wrote {trace.num_tokens} tokens x {len(trace.layers)} MoE layers to {args.out}", file=sys.stderr)
    return 0


def default_predictor_out(model: Path | None) -> Path:
    """`predictor train`'s default --out: a new folder in the working directory, named after the model (never the
    shipped model's own predictors, which a user's training must not silently replace)."""
    from moeflow.config import DEFAULT_MODEL

    return Path(f"{Path(model or DEFAULT_MODEL).resolve().name}-predictors")


def cmd_predictor_train(args: argparse.Namespace) -> int:
    from moeflow.build import load
    from moeflow.predictor.base import predictor_dir
    from moeflow.tools.predictor_eval import train_predictors
    from moeflow.tools.trace import Trace, record_trace

    out = args.out if args.out is not None else default_predictor_out(args.model)
    with load(args.model, expert_budget="all", store="ram") as engine:
        if args.trace is not None:
            trace = Trace.load(args.trace)
        else:
            from moeflow.model.corpus import model_corpus

            trace = record_trace(
                engine, args.data or model_corpus(engine.checkpoint.path, "train"), max_tokens=args.max_tokens
            )
        report = train_predictors(
            engine, trace, _names(args.predictors), out=out, overwrite=args.force, lookahead=args.lookahead,
            epochs=args.epochs,
        )
        beside_model = out.resolve() == predictor_dir(engine.checkpoint.path).resolve()
    if args.json:
        print(json.dumps({name: r.to_json() for name, r in report.items()}))
    else:
        for name, r in report.items():
            done = f"saved {r.path} ({r.train_seconds:.1f} s)" if r.trained else r.why
            print(f"{name}: {done}", file=sys.stderr)
    if not beside_model:
        print(f"[use them with --predictor-dir {out}]", file=sys.stderr)
    return 0


def cmd_predictor_eval(args: argparse.Namespace) -> int:
    from moeflow.build import load
    from moeflow.predictor.apply import available_predictors, engine_predictor_dir
    from moeflow.tools.predictor_eval import evaluate, plot_eval

    with load(args.model, expert_budget="all", store="ram", predictor_dir=args.predictor_dir) as engine:
        have = available_predictors(engine.checkpoint.path, engine_predictor_dir(engine))
        names = _names(args.predictors) if args.predictors else have
        report = evaluate(
            engine, names, args.data or default_data_files(), lookahead=args.lookahead, max_tokens=args.max_tokens
        )
    if args.out is not None:
        report.write(args.out / "predictor_eval.json")
        plot_eval(report, args.out / "predictor_eval.png")
    if args.json:
        print(json.dumps(report.to_json()))
    else:
        for p in report.predictors:
            print(
                f"{p.name:>12}: recall@k {p.recall_at_k:.3f}  recall@2k {p.recall_at_2k:.3f}  "
                f"path accuracy {p.path_accuracy:.3f}  {p.us_per_token:.1f} us/token"
            )
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from moeflow.tools.profile.plot import compare_lines, plot_compare, summary_lines
    from moeflow.tools.profile.report import read_report
    from moeflow.tools.profile.run import profile_model

    if args.compare is not None:
        a, b = (read_report(p) for p in args.compare)
        label_a, label_b = (r.label(p) for r, p in zip((a, b), args.compare))
        png = plot_compare(a, b, label_a, label_b, (args.out or Path(".")) / "profile_compare.png")
        if args.json:
            print(json.dumps({"a": a.to_json()["results"], "b": b.to_json()["results"], "png": str(png)}))
        else:
            print("\n".join(compare_lines(a, b, label_a, label_b)))
            print(f"[wrote {png}]", file=sys.stderr)
        return 0
    config = options_from_args(ProfileConfig, args)
    report = profile_model(
        args.model, config, data=args.data, trace_dir=args.trace, out=args.out, progress=not args.json
    )
    if args.json:
        print(json.dumps(report.to_json()))
    else:
        print("\n".join(summary_lines(report)))
        where = f"wrote {args.out}/profile.json and profile.png" if args.out else "pass --out DIR for JSON + PNG"
        print(f"[{report.tokens:,} tokens replayed; {where}]", file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from moeflow.serve.server import run

    return run(args.model, options_from_args(EngineConfig, args), options_from_args(ServerConfig, args))


def cmd_client(args: argparse.Namespace) -> int:
    from moeflow.serve.client import run_cli

    if args.prompt is None and not args.stats:
        raise MoeflowError("give --prompt TEXT to generate, or --stats to print the server's statistics")
    options_from_args(SamplingParams, args, only=GRPC_SAMPLING)  # checks them
    sampling = {name: getattr(args, name) for name in GRPC_SAMPLING}
    return run_cli(
        f"{args.host}:{args.port}",
        None if args.prompt is None else unescape(args.prompt),
        sampling=sampling,
        unary=args.unary,
        as_json=args.json,
        show_stats=args.stats,
        timeout=args.timeout,
        connection=client_connection(args),
    )


def client_connection(args: argparse.Namespace) -> dict:
    """MoeflowClient's TLS and token keywords from `moeflow client`'s options."""
    token = None
    if args.token_file is not None:
        try:
            token = args.token_file.read_text().strip()
        except OSError as e:
            raise MoeflowError(f"--token-file {args.token_file}: {e.strerror}") from e
        if not token:
            raise MoeflowError(f"--token-file {args.token_file} is empty; put the token in it")
    return {"tls": args.tls, "tls_ca": args.tls_ca, "tls_cert": args.tls_cert, "tls_key": args.tls_key, "token": token}


def _add_generate(sub: argparse._SubParsersAction) -> None:
    gen = sub.add_parser("generate", help="generate text with the experts offloaded")
    _model_option(gen)
    which = gen.add_mutually_exclusive_group(required=True)
    which.add_argument("--prompt", help="prompt text (\\n, \\t and \\\\ escapes)")
    which.add_argument(
        "--prompts", type=Path, help="file with one prompt per line (same escapes), generated in batches"
    )
    gen.add_argument("--batch-size", type=int, default=8, help="--prompts: sequences decoding together (default: 8)")
    gen.add_argument(
        "--admission",
        choices=choices(Admission),
        default="fifo",
        help="--prompts: fifo, or rebatch (group sequences by predicted experts) (default: fifo)",
    )
    gen.add_argument(
        "--rebatch-pool",
        type=int,
        default=None,
        metavar="FACTOR",
        help="--admission rebatch: sequences kept prefilled, as a multiple of --batch-size; a larger pool groups "
        "better (fewer experts per step) and spaces each sequence's tokens further apart (default: 8)",
    )
    gen.add_argument("--json", action="store_true", help="print one JSON object with text, speed and cache stats")
    add_options(gen, SamplingParams)
    add_options(gen, EngineConfig)
    gen.set_defaults(func=cmd_generate)


def _add_chat(sub: argparse._SubParsersAction) -> None:
    chat = sub.add_parser(
        "chat",
        help="chat in the terminal: one message per line on stdin (\\n escapes), the replies streamed to stdout",
    )
    _model_option(chat)
    chat.add_argument("--system", default=None, help="a system message that opens the conversation")
    add_options(chat, SamplingParams)
    add_options(chat, EngineConfig)
    chat.set_defaults(func=cmd_chat)


def _add_trace(sub: argparse._SubParsersAction) -> None:
    trace = sub.add_parser("trace", help="record every token's routing over text files (numpy folder)")
    _model_option(trace)
    _data_option(trace)
    trace.add_argument("--out", type=Path, required=True, help="output folder")
    trace.add_argument("--context", type=int, default=256, help="tokens per forward (chunk length)")
    trace.add_argument("--max-tokens", type=int, default=None, help="stop after this many tokens")
    trace.add_argument(
        "--predictors", default="", help="also record these predictors' predictions, comma-separated (e.g. gate,path)"
    )
    trace.add_argument("--lookahead", type=int, default=1, help="layers ahead the predictors predict (default: 1)")
    _predictor_dir_option(trace)
    trace.set_defaults(func=cmd_trace)


def _add_predictor(sub: argparse._SubParsersAction) -> None:
    pred = sub.add_parser("predictor", help="train and evaluate routing predictors")
    pred_sub = pred.add_subparsers(dest="action", required=True)
    ptrain = pred_sub.add_parser("train", help="record a trace on training text and fit the trainable predictors")
    _model_option(ptrain)
    ptrain.add_argument(
        "--data", type=Path, nargs="+", default=None, help="training text files (default: the corpus' training split)"
    )
    ptrain.add_argument("--trace", type=Path, default=None, help="train on this recorded trace instead of --data")
    ptrain.add_argument(
        "--predictors",
        default="path,sklearn,frequency,token_freq,transition,reuse",
        help="which to train, comma-separated (default: all trainable; reuse is the predictive policy's eviction "
        "model)",
    )
    ptrain.add_argument("--max-tokens", type=int, default=400_000, help="trace at most this many tokens")
    ptrain.add_argument("--epochs", type=int, default=12, help="epochs of the path network (default: 12)")
    ptrain.add_argument("--lookahead", type=int, default=1, help="layers ahead (the transition predictor)")
    ptrain.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder to save the trained predictors in (default: MODEL_NAME-predictors in the working directory; "
        "MODEL/predictors is where the engine looks without --predictor-dir)",
    )
    ptrain.add_argument("--force", action="store_true", help="replace predictors already saved in --out")
    ptrain.add_argument("--json", action="store_true", help="print the training report as JSON")
    ptrain.set_defaults(func=cmd_predictor_train)
    peval = pred_sub.add_parser("eval", help="score predictors on held-out text: recall@k, recall@2k, path accuracy")
    _model_option(peval)
    _data_option(peval)
    peval.add_argument(
        "--predictors", default=None, help="comma-separated (default: every predictor available for the model)"
    )
    peval.add_argument("--max-tokens", type=int, default=100_000, help="evaluate at most this many tokens")
    peval.add_argument("--lookahead", type=int, default=1, help="layers ahead the predictions must be made")
    peval.add_argument("--out", type=Path, default=None, help="write predictor_eval.json and .png here")
    peval.add_argument("--json", action="store_true", help="print the report as JSON")
    _predictor_dir_option(peval)
    peval.set_defaults(func=cmd_predictor_eval)


def _add_profile(sub: argparse._SubParsersAction) -> None:
    prof = sub.add_parser("profile", help="expert-cache hit rates per policy and budget (trace replay), JSON + PNG")
    _model_option(prof)
    _data_option(prof)
    prof.add_argument("--trace", type=Path, default=None, help="replay this recorded trace instead of tracing --data")
    prof.add_argument("--out", type=Path, default=None, help="write profile.json, profile.png and the trace here")
    prof.add_argument("--json", action="store_true", help="print the report as JSON")
    prof.add_argument(
        "--compare",
        type=Path,
        nargs=2,
        metavar=("A.json", "B.json"),
        default=None,
        help="put two profile.json side by side (table + profile_compare.png) instead of profiling",
    )
    add_options(prof, ProfileConfig)
    prof.set_defaults(func=cmd_profile)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    srv = sub.add_parser("serve", help="serve the model over gRPC (moeflow.v1, health, reflection); SIGTERM drains")
    _model_option(srv)
    add_options(srv, ServerConfig)
    add_options(srv, EngineConfig)
    srv.set_defaults(func=cmd_serve)


def cmd_quantize(args: argparse.Namespace) -> int:
    from moeflow.tools.quantize import quantize_checkpoint

    out = quantize_checkpoint(args.model, args.out, args.expert_dtype, group_size=args.group_size)
    print(f"[wrote {out}: experts stored as {args.expert_dtype}; load it with --model {out}]", file=sys.stderr)
    return 0


def _add_quantize(sub: argparse._SubParsersAction) -> None:
    quant = sub.add_parser(
        "quantize", help="write a copy of a model whose experts are stored int8 or int4: misses read 4-8x fewer bytes"
    )
    quant.add_argument("--model", type=Path, required=True, help="the full-precision Hugging Face model folder")
    quant.add_argument("--out", type=Path, required=True, help="the new folder (must not exist, or be empty)")
    quant.add_argument("--expert-dtype", choices=("int8", "int4"), required=True,
                       help="int8: per output channel; int4: group-wise (docs/quantization.md)")  # fmt: skip
    quant.add_argument("--group-size", type=int, default=EngineConfig.group_size,
                       help=f"int4: input columns per scale (default: {EngineConfig.group_size})")  # fmt: skip
    quant.set_defaults(func=cmd_quantize)


def cmd_align(args: argparse.Namespace) -> int:
    from moeflow.tools.align import align_checkpoint

    out = align_checkpoint(args.model, args.out)
    print(f"[wrote {out}: every expert on whole pages, read straight into its slot; load it with --model {out}]",
          file=sys.stderr)  # fmt: skip
    return 0


def _add_align(sub: argparse._SubParsersAction) -> None:
    align = sub.add_parser(
        "align", help="write a copy of a model laid out so that expert reads from disk land straight in their slots"
    )
    align.add_argument("--model", type=Path, required=True, help="the Hugging Face model folder (not quantized)")
    align.add_argument("--out", type=Path, required=True, help="the new folder (must not exist, or be empty)")
    align.set_defaults(func=cmd_align)


def _add_client(sub: argparse._SubParsersAction) -> None:
    client = sub.add_parser("client", help="send a prompt to `moeflow serve` and stream the reply")
    client.add_argument("--host", default="127.0.0.1", help="server address (default: 127.0.0.1)")
    client.add_argument(
        "--port", type=int, default=ServerConfig.port, help=f"server port (default: {ServerConfig.port})"
    )
    client.add_argument("--prompt", default=None, help="prompt text (\\n, \\t and \\\\ escapes)")
    client.add_argument("--unary", action="store_true", help="one reply with the whole text instead of a stream")
    client.add_argument("--json", action="store_true", help="print each reply message as one JSON line")
    client.add_argument("--stats", action="store_true", help="print the server's statistics (JSON)")
    client.add_argument("--timeout", type=float, default=None, help="deadline of each call, in seconds")
    client.add_argument("--tls", action="store_true", help="connect with TLS, trusting the system's CAs")
    client.add_argument("--tls-ca", type=Path, default=None, help="connect with TLS, trusting this CA (PEM)")
    client.add_argument("--tls-cert", type=Path, default=None, help="mutual TLS: this client's certificate (PEM)")
    client.add_argument("--tls-key", type=Path, default=None, help="mutual TLS: this client's private key (PEM)")
    client.add_argument("--token-file", type=Path, default=None, help="file holding the server's bearer token")
    add_options(client, SamplingParams, only=GRPC_SAMPLING)
    client.set_defaults(func=cmd_client)


def cmd_families(args: argparse.Namespace) -> int:
    import transformers

    from moeflow.model.catalog import catalog

    rows = catalog()
    if args.markdown:
        from moeflow.model.catalog import render_markdown

        print(render_markdown(rows), end="")
        return 0
    width = max(len(r.model_type) for r in rows)
    for r in rows:
        print(f"{r.model_type:<{width}}  {r.status:<11}  {r.detail}")
    from moeflow.testing import TESTED_WITH

    installed = transformers.__version__
    note = "" if installed == TESTED_WITH else f"; the installed transformers is {installed}: re-run the tests"
    print(f"[tested: engine-exactness suite with transformers {TESTED_WITH}{note}]", file=sys.stderr)
    return 0


def _add_families(sub: argparse._SubParsersAction) -> None:
    fam = sub.add_parser("families", help="every MoE model type of the installed transformers: served or why not")
    fam.add_argument("--markdown", action="store_true", help="print docs/families.md's table instead")
    fam.set_defaults(func=cmd_families)


def version_text() -> str:
    """`moeflow --version`: this package's version and those of the libraries it runs on (read without importing
    them, so it costs nothing)."""
    from importlib.metadata import PackageNotFoundError, version

    def of(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:
            return "not installed"

    return f"moeflow {of('moeflow')} (torch {of('torch')}, transformers {of('transformers')})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moeflow",
        description="Run Mixture-of-Experts models with most experts on disk or in host RAM, token for token what "
        "transformers generates; profile the expert cache; serve over gRPC. `moeflow COMMAND --help` for each.",
    )
    parser.add_argument("--version", action="version", version=version_text())
    sub = parser.add_subparsers(dest="command", required=True)
    adders = (
        _add_generate, _add_chat, _add_trace, _add_predictor, _add_profile, _add_quantize, _add_align, _add_serve,
        _add_client,
    )
    for add in (*adders, _add_families):
        add(sub)
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
