"""The command line generated from config dataclasses (`moeflow.options`), and `moeflow`'s own parser."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
from moeflow.serve.config import ServerConfig

from moeflow.cli import GRPC_SAMPLING, build_parser, main, read_prompts, unescape
from moeflow.config import EngineConfig, ProfileConfig, SamplingParams
from moeflow.errors import MoeflowError
from moeflow.options import add_options, options_from_args

Color = Literal["red", "green"]


@dataclass(frozen=True, kw_only=True)
class Example:
    """One field of each kind the generator knows."""

    name: str  # no default: a required option
    count: int = field(default=3, metadata={"help": "how many"})
    ratio: float = field(default=0.5, metadata={"help": "share, 50% by default"})
    fast: bool = field(default=True, metadata={"help": "go fast"})
    color: Color = field(default="red", metadata={"help": "paint"})
    seed: int | None = field(default=None, metadata={"help": "random seed"})
    sizes: tuple[int, ...] = field(default=(1, 2), metadata={"help": "sizes to try"})
    root: Path = field(default=Path("out"), metadata={"help": "where"})


def _parser(cls: type) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="example")
    add_options(parser, cls)
    return parser


def test_defaults_round_trip_for_every_config():
    for cls in (EngineConfig, SamplingParams, ServerConfig, ProfileConfig):
        assert options_from_args(cls, _parser(cls).parse_args([])) == cls(), cls.__name__


def test_each_field_kind_parses_to_its_type():
    got = options_from_args(
        Example,
        _parser(Example).parse_args(
            ["--name", "x", "--count", "7", "--ratio", "0.25", "--no-fast", "--color", "green", "--seed", "5",
             "--sizes", "4", "8", "16", "--root", "/tmp/r"]  # fmt: skip
        ),
    )
    assert got == Example(
        name="x", count=7, ratio=0.25, fast=False, color="green", seed=5, sizes=(4, 8, 16), root=Path("/tmp/r")
    )
    defaults = options_from_args(Example, _parser(Example).parse_args(["--name", "y"]))
    assert defaults == Example(name="y") and isinstance(defaults.sizes, tuple)


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--name", "x", "--color", "blue"], "invalid choice: 'blue'"),
        (["--name", "x", "--count", "three"], "invalid int value: 'three'"),
        ([], "the following arguments are required: --name"),
    ],
    ids=["literal-outside-choices", "not-an-int", "required-field-missing"],
)
def test_argparse_refuses(argv, says, capsys):
    with pytest.raises(SystemExit) as exit_:
        _parser(Example).parse_args(argv)
    assert exit_.value.code == 2
    assert says in capsys.readouterr().err


def test_help_has_field_help_default_and_choices():
    text = _parser(Example).format_help()  # "%" in help and defaults must not break argparse's %-formatting
    for piece in ("how many (default: 3)", "50% by default (default: 0.5)", "--fast, --no-fast", "{red,green}",
                  "sizes to try (default: 1 2)", "--seed SEED"):  # fmt: skip
        assert piece in " ".join(text.split()), piece
    assert "(default: None)" not in text


def test_a_type_without_command_line_form_is_refused():
    @dataclass(frozen=True, kw_only=True)
    class Odd:
        mapping: dict = field(default_factory=dict)

    with pytest.raises(TypeError, match="Odd.mapping"):
        add_options(argparse.ArgumentParser(), Odd)


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "--prompt", "x", "--admission", "bogus"],
        ["generate", "--prompt", "x", "--store", "tape"],
        ["generate", "--prompt", "x", "--policy", "belady"],
        ["serve", "--admission", "lifo"],
        ["profile", "--live-store", "tape"],
    ],
    ids=["generate-admission", "generate-store", "generate-live-policy", "serve-admission", "profile-live-store"],
)
def test_moeflow_refuses_unknown_choices(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(argv)
    assert exit_.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_serve_and_client_options_come_from_the_configs():
    args = build_parser().parse_args(["serve", "--max-batch-size", "3", "--admission", "rebatch", "--no-direct-io"])
    assert options_from_args(ServerConfig, args) == ServerConfig(max_batch_size=3, admission="rebatch")
    assert options_from_args(EngineConfig, args) == EngineConfig(direct_io=False)
    args = build_parser().parse_args(["serve", "--admission", "rebatch", "--rebatch-pool", "2"])
    assert options_from_args(ServerConfig, args) == ServerConfig(admission="rebatch", rebatch_pool=2)
    with pytest.raises(MoeflowError, match="--rebatch-pool must be at least 1"):
        ServerConfig(rebatch_pool=0)
    args = build_parser().parse_args(["client", "--prompt", "hi", "--seed", "3", "--top-p", "0.5"])
    assert options_from_args(SamplingParams, args, only=GRPC_SAMPLING) == SamplingParams(seed=3, top_p=0.5)
    assert args.port == ServerConfig().port
    with pytest.raises(SystemExit):  # the gRPC API does not carry top-k: the client does not offer it
        build_parser().parse_args(["client", "--prompt", "hi", "--top-k", "3"])


# ---- prompt escapes: one function for --prompt and --prompts -------------------------------------------------


@pytest.mark.parametrize(
    "text, want",
    [
        ("a\\nb", "a\nb"),
        ("col\\tcol", "col\tcol"),
        ("C:\\\\new", "C:\\new"),  # an escaped backslash keeps the n that follows it
        ("\\x and \\", "\\x and \\"),  # anything else stays as written
        ("plain", "plain"),
    ],
)
def test_unescape(text, want):
    assert unescape(text) == want


def test_prompts_file_uses_the_same_escapes(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a\\nb\n\n  \nC:\\\\new\\tx\n", encoding="utf-8")
    assert read_prompts(path) == ["a\nb", "C:\\new\tx"]


def test_generate_prompt_is_unescaped(tiny_checkpoints, capsys):
    model = tiny_checkpoints["mixtral"]
    outputs = []
    for argv in (["--prompt", "a\\nb"], ["--prompt", "a\nb"]):
        assert main(["generate", "--model", str(model), *argv, "--max-new-tokens", "2", "--json"]) == 0
        outputs.append(json.loads(capsys.readouterr().out))
    assert outputs[0]["prompt_token_ids"] == outputs[1]["prompt_token_ids"]
    assert outputs[0]["token_ids"] == outputs[1]["token_ids"]


def test_rebatch_pool_option(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("def f(x):\nimport numpy as np\nclass A:\nfor i in range(3):\nreturn self\n")
    argv = ["generate", "--prompts", str(prompts), "--batch-size", "2", "--max-new-tokens", "4", "--json"]
    assert main([*argv, "--admission", "rebatch", "--rebatch-pool", "2"]) == 0
    *pooled, summary = [json.loads(line) for line in capsys.readouterr().out.splitlines()]  # a line per prompt
    assert main([*argv, "--admission", "fifo"]) == 0
    *fifo, _ = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert summary["prompts"] == len(fifo) == 5 and summary["admission"] == "rebatch"
    assert [r["token_ids"] for r in pooled] == [r["token_ids"] for r in fifo]
    assert main([*argv, "--rebatch-pool", "2"]) == 2
    assert "use it with --admission rebatch" in capsys.readouterr().err
    assert main([*argv, "--admission", "rebatch", "--rebatch-pool", "0"]) == 2
    assert "--rebatch-pool must be at least 1" in capsys.readouterr().err
