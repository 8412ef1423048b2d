"""`moeflow align`: the same tensors under the same names, every expert on whole pages in the slot's order, so that
the store reads gate and up in one request straight into the slot and down in another; transformers loads the copy,
and greedy tokens through moeflow stay transformers'."""

import pytest
import torch
from safetensors.torch import load_file

import moeflow
from moeflow.cli import main
from moeflow.errors import MoeflowError
from moeflow.model.checkpoint import open_checkpoint
from moeflow.testing import save_tiny_checkpoint
from moeflow.tools.align import align_checkpoint
from moeflow.tools.quantize import quantize_checkpoint


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """Experts of whole pages (gate/up [64, 32] and down [32, 64] fp32: 8 KiB each) as safetensors' writer lays
    them out: after a header that ends off a page, w1, w2, w3 of an expert back to back."""
    path = save_tiny_checkpoint("mixtral", tmp_path_factory.mktemp("align") / "src", intermediate_size=64,
                                hidden_size=32, tokenizer=True)  # fmt: skip
    ckpt = open_checkpoint(path)
    assert not all(s.offset % 4096 == 0 for loc in ckpt.experts.values() for s in loc.spans)
    return path


def _tensors(folder):
    return {name: t for shard in sorted(folder.glob("*.safetensors")) for name, t in load_file(shard).items()}


def test_the_copy_holds_the_same_tensors_with_every_expert_on_whole_pages(packed, tmp_path):
    out = align_checkpoint(packed, tmp_path / "aligned", progress=False)
    before, after = _tensors(packed), _tensors(out)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(p.name for p in packed.glob("*.safetensors"))
    ckpt = open_checkpoint(out)
    for loc in ckpt.experts.values():
        assert all(s.offset % 4096 == 0 for s in loc.spans)
    with moeflow.load(out, expert_budget="all") as engine:
        pool, store = engine.cache.pool, engine.cache.store
        for key in engine.checkpoint.experts:
            plan = store._byte_plan(key, (pool.gate_up_S2ID[0], pool.down_SDI[0]))
            assert [(r.direct, len(r.pieces)) for r in plan] == [(True, 2), (True, 1)]  # gate + up, then down


def test_the_copy_decodes_as_transformers_and_moeflow_decode_the_original(packed, tmp_path):
    from transformers import AutoModelForCausalLM

    out = align_checkpoint(packed, tmp_path / "aligned", progress=False)
    prompt = [1, 5, 9, 13, 2, 7]
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)  # the copy is a transformers checkpoint
    want = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=12)[0, len(prompt) :].tolist()
    for path in (packed, out):
        with moeflow.load(path, expert_budget="25%", store="disk") as engine:
            assert engine.generate(prompt, max_new_tokens=12, temperature=0).token_ids == want
            assert engine.stats().misses > 0


def test_align_refuses_what_it_cannot_do_and_leaves_nothing_behind(packed, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(MoeflowError, match="never overwrites"):
        align_checkpoint(packed, taken, progress=False)
    assert [p.name for p in taken.iterdir()] == ["notes.txt"]
    quantized = quantize_checkpoint(packed, tmp_path / "int8", "int8", progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MoeflowError, match="already lays experts out on whole pages"):
        align_checkpoint(quantized, empty, progress=False)
    assert empty.is_dir() and not any(empty.iterdir())
    assert main(["align", "--model", str(packed), "--out", str(tmp_path / "cli")]) == 0
    assert "straight into its slot" in capsys.readouterr().err
    assert main(["align", "--model", str(packed), "--out", str(tmp_path / "cli")]) == 2
    assert "never overwrites" in capsys.readouterr().err
