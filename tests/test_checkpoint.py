"""Checkpoint reading (both layouts, slices, validation errors), the synthetic writer, and `make-checkpoint`."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gptoss_cluster.cluster.cli import main
from gptoss_cluster.kernels.mxfp4 import dequantize_mxfp4
from gptoss_cluster.workers import checkpoint as ckpt
from gptoss_cluster.workers.checkpoint import (
    CheckpointError,
    expected_tensors,
    open_checkpoint,
    progress_enabled,
    synthetic_tensor,
    write_checkpoint,
)
from gptoss_cluster.workers.config import ConfigError, ModelConfig

# The tiny preset with 2 layers and hidden size 64: ~53 MB (mostly the real-size vocabulary, which the original layout
# needs: its config.json has no eos/pad ids, so they take the real defaults).
SMALL = ModelConfig.preset("tiny", num_hidden_layers=2, hidden_size=64, intermediate_size=64)
SHARD = 200_000  # bytes per shard in the sharded checkpoints
Q0 = "model.layers.0.self_attn.q_proj.weight"
GATE_UP = "model.layers.1.mlp.experts.gate_up_proj"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpts")
    return {
        "hf": write_checkpoint(SMALL, root / "hf", seed=7),
        "original": write_checkpoint(SMALL, root / "original", layout="original", seed=7),
        "sharded": write_checkpoint(SMALL, root / "sharded", seed=7, max_shard_bytes=SHARD),
        "original_sharded": write_checkpoint(
            SMALL, root / "original_sharded", layout="original", seed=7, max_shard_bytes=SHARD
        ),
    }


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


# =================================================================================================== layouts
def test_expected_tensors_shapes() -> None:
    specs = expected_tensors(SMALL)
    assert len(specs) == 3 + 19 * SMALL.num_hidden_layers
    assert specs[Q0].shape == (8 * 32, 64)
    assert specs["model.layers.0.self_attn.k_proj.weight"].shape == (4 * 32, 64)
    assert specs["model.layers.0.self_attn.o_proj.weight"].shape == (64, 256)
    assert specs["model.layers.1.mlp.experts.gate_up_proj_blocks"].shape == (8, 128, 2, 16)
    assert specs["model.layers.1.mlp.experts.down_proj_scales"].shape == (8, 64, 2)
    assert specs["lm_head.weight"].shape == (201088, 64)
    assert specs["model.layers.1.mlp.experts.down_proj_blocks"].dtypes == (torch.uint8,)
    assert torch.float32 in specs["model.layers.0.self_attn.sinks"].dtypes


def test_layouts_hold_identical_tensors(ckpts: dict[str, Path]) -> None:
    readers = [open_checkpoint(ckpts[k]) for k in ("hf", "original", "sharded", "original_sharded")]
    hf = readers[0]
    assert [r.layout for r in readers] == ["hf", "original", "hf", "original"]
    assert all(r.config == SMALL for r in readers)
    for name, spec in expected_tensors(SMALL).items():
        ref = hf.read(name)
        assert tuple(ref.shape) == spec.shape and ref.dtype == spec.dtype, name
        for other in readers[1:]:
            assert other.shape(name) == spec.shape
            got = other.read(name)
            assert got.dtype == ref.dtype and torch.equal(got, ref), (other.path, name)
    for r in readers:
        r.close()


@pytest.mark.parametrize(
    "name, index",
    [
        (Q0, (slice(2, 5),)),
        ("model.layers.1.self_attn.k_proj.weight", (slice(32, 96),)),
        ("model.layers.1.self_attn.v_proj.weight", (slice(96, 128), slice(10, 20))),
        ("model.layers.0.self_attn.v_proj.bias", (slice(0, 64),)),
        ("model.layers.0.self_attn.q_proj.bias", (slice(250, None),)),
        ("model.layers.0.self_attn.o_proj.weight", (slice(None), slice(64, 128))),
        ("model.layers.1.mlp.experts.gate_up_proj_blocks", (slice(2, 4),)),
        ("model.layers.1.mlp.experts.down_proj_scales", (slice(6, 8), slice(0, 10))),
        ("model.embed_tokens.weight", (slice(512, 1024),)),
        ("lm_head.weight", (slice(0, 10, 3),)),
    ],
)
def test_partial_reads_match_full_tensor(ckpts: dict[str, Path], name: str, index: tuple[slice, ...]) -> None:
    with open_checkpoint(ckpts["hf"]) as hf, open_checkpoint(ckpts["original"]) as orig:
        full = hf.read(name)
        expected = full[index]
        for reader in (hf, orig):
            got = reader.read(name, index)
            assert got.shape == expected.shape
            assert torch.equal(got, expected)
            assert reader.slice_nbytes(name, index) == got.numel() * got.element_size()


def test_original_layout_stores_fused_qkv(ckpts: dict[str, Path]) -> None:
    stored = load_file(ckpts["original"] / "model.safetensors")
    assert "block.0.attn.qkv.weight" in stored and "model.embed_tokens.weight" not in stored
    with open_checkpoint(ckpts["hf"]) as hf:
        qkv = torch.cat([hf.read(f"model.layers.0.self_attn.{p}_proj.weight") for p in "qkv"])
        assert torch.equal(stored["block.0.attn.qkv.weight"], qkv)
        assert torch.equal(stored["block.1.mlp.gate.weight"], hf.read("model.layers.1.mlp.router.weight"))
    with open_checkpoint(ckpts["original"]) as orig:  # stored names can be read too
        assert torch.equal(orig.read("block.0.attn.qkv.weight", (slice(0, 4),)), qkv[:4])
    config = json.loads((ckpts["original"] / "config.json").read_text())
    assert "model_type" not in config and config["num_experts"] == SMALL.num_experts


def test_written_values_are_synthetic_tensor(ckpts: dict[str, Path]) -> None:
    with open_checkpoint(ckpts["sharded"]) as r:
        for name in r.names():
            assert torch.equal(r.read(name), synthetic_tensor(SMALL, name, seed=7)), name
    part = synthetic_tensor(SMALL, "model.embed_tokens.weight", seed=7, rows=(100, 110))
    assert torch.equal(part, synthetic_tensor(SMALL, "model.embed_tokens.weight", seed=7)[100:110])


def test_synthetic_chunks_do_not_depend_on_order(monkeypatch: pytest.MonkeyPatch) -> None:
    # With tiny chunks, any row range is still the same rows of the whole tensor.
    monkeypatch.setattr(ckpt, "CHUNK_VALUES", 64 * 5)
    whole = synthetic_tensor(SMALL, Q0, seed=3)
    assert torch.equal(synthetic_tensor(SMALL, Q0, seed=3, rows=(7, 23)), whole[7:23])
    assert synthetic_tensor(SMALL, Q0, seed=3, rows=(9, 9)).shape == (0, 64)
    blocks = synthetic_tensor(SMALL, GATE_UP + "_blocks", seed=3)  # experts: 1 per chunk here
    assert torch.equal(synthetic_tensor(SMALL, GATE_UP + "_blocks", seed=3, rows=(3, 5)), blocks[3:5])


def test_value_scales(ckpts: dict[str, Path]) -> None:
    with open_checkpoint(ckpts["hf"]) as r:
        h = SMALL.hidden_size
        emb = r.read("model.embed_tokens.weight").float()
        assert abs(emb.std().item() - 1.0) < 0.05
        assert abs(r.read("lm_head.weight").float().std().item() - 2 / h**0.5) < 0.01
        norm = r.read("model.layers.0.input_layernorm.weight").float()
        assert abs(norm.mean().item() - 1.0) < 0.05 and 0.05 < norm.std().item() < 0.15
        assert abs(r.read(Q0).float().std().item() - h**-0.5) < 0.01
        assert r.read("model.layers.0.self_attn.q_proj.bias").float().abs().max() < 0.5
        # Different tensors get different values (seeded by name).
        assert not torch.equal(r.read(Q0)[:32], r.read("model.layers.0.self_attn.k_proj.weight")[:32])
        assert not torch.equal(r.read(Q0), r.read("model.layers.1.self_attn.q_proj.weight"))


# =================================================================================================== determinism
def _file_bytes(path: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(path.iterdir())}


def test_same_seed_gives_identical_files(ckpts: dict[str, Path], tmp_path: Path) -> None:
    for key, kwargs in (("hf", {}), ("original_sharded", {"layout": "original", "max_shard_bytes": SHARD})):
        again = write_checkpoint(SMALL, tmp_path / key, seed=7, **kwargs)
        assert _file_bytes(again) == _file_bytes(ckpts[key])
    other = write_checkpoint(SMALL, tmp_path / "seed8", seed=8)
    with open_checkpoint(other) as a, open_checkpoint(ckpts["hf"]) as b:
        for name in a.names():
            assert not torch.equal(a.read(name), b.read(name)), name


# =================================================================================================== sharding
def test_sharded_hf_has_index_and_several_files(ckpts: dict[str, Path]) -> None:
    files = sorted(p.name for p in ckpts["sharded"].glob("*.safetensors"))
    assert len(files) > 2
    n = len(files) - 1
    assert files == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(len(files))]
    index = json.loads((ckpts["sharded"] / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(expected_tensors(SMALL))
    assert set(index["weight_map"].values()) == set(files)
    assert index["metadata"]["total_size"] == sum(s.nbytes for s in expected_tensors(SMALL).values())
    for f in files:  # within the cap, unless a single tensor is bigger
        in_file = [n for n, file in index["weight_map"].items() if file == f]
        assert (ckpts["sharded"] / f).stat().st_size <= SHARD + 10_000 or len(in_file) == 1
    with open_checkpoint(ckpts["sharded"]) as r:
        assert r.file_size_bytes == sum((ckpts["sharded"] / f).stat().st_size for f in files)
    assert len(list(ckpts["original_sharded"].glob("*.safetensors"))) > 2
    assert not (ckpts["original_sharded"] / "model.safetensors.index.json").exists()
    assert sorted(p.name for p in ckpts["hf"].iterdir()) == ["config.json", "model.safetensors"]


def test_default_shard_size() -> None:
    sizes = [(f"t{i}", 1 << 30) for i in range(13)]
    assert [len(s) for s in ckpt._plan_shards(sizes, ckpt.DEFAULT_SHARD_BYTES)] == [4, 4, 4, 1]
    assert [len(s) for s in ckpt._plan_shards([("big", 10), ("a", 1)], 5)] == [1, 1]


# =================================================================================================== MXFP4
@pytest.mark.parametrize("proj", ["gate_up_proj", "down_proj"])
def test_mxfp4_blocks_round_trip(ckpts: dict[str, Path], proj: str) -> None:
    base = f"model.layers.1.mlp.experts.{proj}"
    with open_checkpoint(ckpts["original"]) as r:
        blocks, scales = r.read(base + "_blocks"), r.read(base + "_scales")
    weight = synthetic_tensor(SMALL, base, seed=7)
    assert weight.dtype == torch.float32
    deq = dequantize_mxfp4(blocks, scales)
    assert deq.shape == weight.shape
    # Round to nearest e2m1: the error is at most one unit of the block's scale (half the widest gap, 4 -> 6).
    unit = torch.exp2(scales.float() - 127).repeat_interleave(32, dim=-1)
    assert ((deq - weight).abs() <= unit).all()
    rel = (deq - weight).norm() / weight.norm()
    assert rel < 0.2
    std = SMALL.hidden_size**-0.5 if proj == "gate_up_proj" else SMALL.intermediate_size**-0.5
    assert abs(weight.std().item() - std) < 0.1 * std
    # Experts differ from each other.
    assert not torch.equal(blocks[0], blocks[1])


# =================================================================================================== lazy reads
def _mapped_file_bytes() -> int:
    """Resident file-backed memory of this process (memory-mapped checkpoint pages count here)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[2]) * os.sysconf("SC_PAGE_SIZE")


def test_slice_read_does_not_load_whole_tensor(
    ckpts: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = SMALL.replace(vocab_size=65536, hidden_size=512, num_hidden_layers=1, eos_token_id=1, pad_token_id=0)
    path = write_checkpoint(config, tmp_path / "big", seed=1)  # embedding: 64 MiB of bf16
    expected = synthetic_tensor(config, "model.embed_tokens.weight", seed=1, rows=(40000, 40010))
    with open_checkpoint(path) as r:
        r.read("model.layers.0.input_layernorm.weight")  # warm up
        before = _mapped_file_bytes()
        part = r.read("model.embed_tokens.weight", (slice(40000, 40010),))
        assert part.shape == (10, 512) and torch.equal(part, expected)
        grown = _mapped_file_bytes() - before
        assert grown < 16 * 1024 * 1024, grown
        # Row ranges are read with pread, and only their bytes; a column slice goes through safetensors' get_slice.
        reads: list[int] = []
        real_preadv = os.preadv

        def spy_preadv(fd, buffers, offset):
            reads.append(sum(len(b) for b in buffers))
            return real_preadv(fd, buffers, offset)

        monkeypatch.setattr(os, "preadv", spy_preadv)
        k = r.read("model.layers.0.self_attn.k_proj.weight", (slice(32, 64),))
        assert sum(reads) == 32 * config.hidden_size * 2 and k.shape == (32, config.hidden_size)
        kv_row_bytes = SMALL.hidden_size * 2
    with open_checkpoint(ckpts["original"]) as r, open_checkpoint(ckpts["hf"]) as hf:
        reads.clear()
        part = r.read("model.layers.0.self_attn.k_proj.weight", (slice(32, 64),))
        assert sum(reads) == 32 * kv_row_bytes  # rows of the fused qkv tensor, nothing more
        assert torch.equal(part, hf.read("model.layers.0.self_attn.k_proj.weight", (slice(32, 64),)))
        reads.clear()
        cols = r.read("model.layers.0.self_attn.o_proj.weight", (slice(None), slice(8, 24)))
        assert reads == [] and cols.shape == (SMALL.hidden_size, 16)
        assert torch.equal(cols, hf.read("model.layers.0.self_attn.o_proj.weight")[:, 8:24])


def test_reads_are_private_copies(ckpts: dict[str, Path]) -> None:
    with open_checkpoint(ckpts["hf"]) as r:
        first = r.read("lm_head.weight", (slice(0, 4),))
        original = first.clone()
        first.add_(1)
        assert torch.equal(r.read("lm_head.weight", (slice(0, 4),)), original)
        view = r.read("lm_head.weight", (slice(0, 4),), copy=False)
        assert torch.equal(view, original)
    assert torch.equal(first, original + 1)  # still valid after close


def test_iter_tensors_and_progress(ckpts: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    with open_checkpoint(ckpts["original"]) as r:
        got = dict(r.iter_tensors(desc="test"))
        assert list(got) == r.names()
        sliced = dict(r.iter_tensors([Q0, "lm_head.weight"], index={Q0: (slice(0, 3),)}))
        assert sliced[Q0].shape == (3, SMALL.hidden_size)
        assert sliced["lm_head.weight"].shape == (SMALL.vocab_size, SMALL.hidden_size)
        by_fn = dict(r.iter_tensors([Q0], index=lambda name: (slice(1, 2),)))
        assert torch.equal(by_fn[Q0], got[Q0][1:2])
    assert not progress_enabled(1 << 40) or os.isatty(2)  # pytest captures stderr: never a TTY here
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    monkeypatch.delenv("GPTOSS_NO_PROGRESS", raising=False)
    assert progress_enabled(1 << 40)
    assert not progress_enabled(1 << 20)  # small: no bar
    assert not progress_enabled(1 << 40, progress=False)
    monkeypatch.setenv("GPTOSS_NO_PROGRESS", "1")
    assert not progress_enabled(1 << 40)


def test_closed_reader_refuses_reads(ckpts: dict[str, Path]) -> None:
    r = open_checkpoint(ckpts["hf"])
    r.close()
    with pytest.raises(CheckpointError, match="closed"):
        r.read(Q0)


def test_bad_read_arguments(ckpts: dict[str, Path]) -> None:
    with open_checkpoint(ckpts["hf"]) as r:
        with pytest.raises(CheckpointError, match="no tensor named 'nope'"):
            r.read("nope")
        with pytest.raises(TypeError):
            r.read(Q0, (3,))  # type: ignore[arg-type]
        with pytest.raises(IndexError):
            r.read("model.norm.weight", (slice(0, 1), slice(0, 1)))


# =================================================================================================== errors
def test_nonexistent_path(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        open_checkpoint(tmp_path / "nope")


def test_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no config.json"):
        open_checkpoint(tmp_path)


def test_bad_config_is_both_errors(ckpts: dict[str, Path], tmp_path: Path) -> None:
    bad = _copy(ckpts["hf"], tmp_path / "bad")
    config = json.loads((bad / "config.json").read_text())
    config["num_attention_heads"] = 7
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="num_key_value_heads") as info:
        open_checkpoint(bad)
    assert isinstance(info.value, ConfigError)


def _rewrite(file: Path, change) -> None:
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_missing_tensor_named(ckpts: dict[str, Path], tmp_path: Path) -> None:
    bad = _copy(ckpts["hf"], tmp_path / "bad")
    _rewrite(bad / "model.safetensors", lambda t: t.pop("model.layers.1.mlp.router.weight"))
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(bad)
    assert "missing tensor 'model.layers.1.mlp.router.weight' (expected in model.safetensors)" in str(info.value)


def test_missing_tensor_original_names_both(ckpts: dict[str, Path], tmp_path: Path) -> None:
    bad = _copy(ckpts["original"], tmp_path / "bad")
    _rewrite(bad / "model.safetensors", lambda t: t.pop("block.1.attn.qkv.bias"))
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(bad)
    message = str(info.value)
    assert "'block.1.attn.qkv.bias'" in message and "'model.layers.1.self_attn.k_proj.bias'" in message
    assert "model.safetensors" in message


def test_missing_tensor_in_shard(ckpts: dict[str, Path], tmp_path: Path) -> None:
    bad = _copy(ckpts["sharded"], tmp_path / "bad")
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["lm_head.weight"]
    _rewrite(bad / shard, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match=f"missing tensor 'lm_head.weight' \\(expected in {shard}\\)"):
        open_checkpoint(bad)
    del index["weight_map"]["lm_head.weight"]
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="'lm_head.weight' \\(not listed in model.safetensors.index.json\\)"):
        open_checkpoint(bad)


def test_wrong_shape(ckpts: dict[str, Path], tmp_path: Path) -> None:
    bad = _copy(ckpts["hf"], tmp_path / "bad")
    name = "model.layers.0.self_attn.k_proj.weight"
    _rewrite(bad / "model.safetensors", lambda t: t.__setitem__(name, t[name][:64].contiguous()))
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(bad)
    assert f"'{name}'" in str(info.value) and "[64, 64]" in str(info.value) and "[128, 64]" in str(info.value)
    assert "model.safetensors" in str(info.value)


def test_wrong_dtype(ckpts: dict[str, Path], tmp_path: Path) -> None:
    bad = _copy(ckpts["hf"], tmp_path / "bad")
    name = "model.layers.1.mlp.experts.down_proj_scales"
    _rewrite(bad / "model.safetensors", lambda t: t.__setitem__(name, t[name].to(torch.int32)))
    with pytest.raises(CheckpointError, match=f"'{name}' in .*model.safetensors has dtype I32, expected U8"):
        open_checkpoint(bad)
    bad2 = _copy(ckpts["hf"], tmp_path / "bad2")
    _rewrite(bad2 / "model.safetensors", lambda t: t.__setitem__(Q0, t[Q0].to(torch.float64)))
    with pytest.raises(CheckpointError, match="dtype F64, expected BF16/F16/F32"):
        open_checkpoint(bad2)


def test_float32_norms_and_sinks_accepted_and_extras_tolerated(ckpts: dict[str, Path], tmp_path: Path) -> None:
    ok = _copy(ckpts["hf"], tmp_path / "ok")
    sinks = "model.layers.0.self_attn.sinks"

    def change(t: dict[str, torch.Tensor]) -> None:
        t[sinks] = t[sinks].float()
        t["model.norm.weight"] = t["model.norm.weight"].float()
        t["some.extra.tensor"] = torch.zeros(3)

    _rewrite(ok / "model.safetensors", change)
    with open_checkpoint(ok) as r:
        assert r.dtype(sinks) == torch.float32 and r.read(sinks).dtype == torch.float32
        assert r.extra_names == ["some.extra.tensor"]
        assert sinks in r.names() and "some.extra.tensor" not in r.names()


def test_truncated_file(ckpts: dict[str, Path], tmp_path: Path) -> None:
    bad = _copy(ckpts["hf"], tmp_path / "bad")
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated"):
        open_checkpoint(bad)
    f.write_bytes(f.read_bytes()[:100])  # cut inside the header
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated"):
        open_checkpoint(bad)


def test_trailing_garbage(ckpts: dict[str, Path], tmp_path: Path) -> None:
    bad = _copy(ckpts["hf"], tmp_path / "bad")
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes() + b"x" * 10)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt"):
        open_checkpoint(bad)


@pytest.mark.parametrize(
    "content",
    [b"", b"abc", os.urandom(4096), struct.pack("<Q", 10) + b"not json!!", struct.pack("<Q", 2) + b"[]"],
)
def test_garbage_file(ckpts: dict[str, Path], tmp_path: Path, content: bytes) -> None:
    bad = _copy(ckpts["original"], tmp_path / "bad")
    (bad / "model.safetensors").write_bytes(content)
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        open_checkpoint(bad)


def test_index_points_at_missing_file(ckpts: dict[str, Path], tmp_path: Path) -> None:
    bad = _copy(ckpts["sharded"], tmp_path / "bad")
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    gone = index["weight_map"]["lm_head.weight"]
    (bad / gone).unlink()
    with pytest.raises(CheckpointError, match=f"missing file '{gone}'"):
        open_checkpoint(bad)
    (bad / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="model.safetensors.index.json"):
        open_checkpoint(bad)


def test_no_safetensors_files(ckpts: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_bytes((ckpts["original"] / "config.json").read_bytes())
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors files"):
        open_checkpoint(bad)


# =================================================================================================== writer safety
def test_interrupted_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ckpt, "quantize_mxfp4", _fail_on_call(ckpt.quantize_mxfp4, 2))
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(SMALL, tmp_path / "out", seed=0)
    assert list(tmp_path.iterdir()) == []


def _fail_on_call(real, n: int):
    calls = [0]

    def wrapper(weight: torch.Tensor):
        calls[0] += 1
        if calls[0] == n:
            raise KeyboardInterrupt
        return real(weight)

    return wrapper


def test_existing_output_directory(ckpts: dict[str, Path], tmp_path: Path) -> None:
    out = _copy(ckpts["hf"], tmp_path / "out")
    with pytest.raises(FileExistsError, match="not empty"):
        write_checkpoint(SMALL, out, seed=1)
    write_checkpoint(SMALL, out, seed=1, overwrite=True, layout="original")
    with open_checkpoint(out) as r:
        assert r.layout == "original"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary leftovers
    other = tmp_path / "notckpt"
    other.mkdir()
    (other / "precious.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not a checkpoint"):
        write_checkpoint(SMALL, other, seed=1, overwrite=True)
    assert (other / "precious.txt").read_text() == "keep"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert write_checkpoint(SMALL, empty, seed=1) == empty.absolute()
    umask = os.umask(0o022)
    os.umask(umask)
    assert empty.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's private 0700


def test_layout_that_cannot_express_config(tmp_path: Path) -> None:
    small_vocab = SMALL.replace(vocab_size=1024, eos_token_id=1000, pad_token_id=999)
    with pytest.raises(ConfigError, match="original layout"):  # no eos/pad ids in the original config.json
        write_checkpoint(small_vocab, tmp_path / "x", layout="original")
    with pytest.raises(ConfigError, match="rms_norm_eps"):
        write_checkpoint(SMALL.replace(rms_norm_eps=1e-6), tmp_path / "x", layout="original")
    assert list(tmp_path.iterdir()) == []


# =================================================================================================== CLI
def test_cli_make_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    assert main(["make-checkpoint", "--preset", "tiny", "--layout", "hf", "--seed", "1", "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    with open_checkpoint(out) as r:
        assert r.config == ModelConfig.preset("tiny") and r.layout == "hf"
        assert torch.equal(r.read(Q0), synthetic_tensor(ModelConfig.preset("tiny"), Q0, seed=1))
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.GptOssConfig.from_pretrained(out)
    assert hf_config.num_local_experts == 8 and hf_config.hidden_size == 192

    # Existing output without --force: one line, exit code 2.
    assert main(["make-checkpoint", "--preset", "tiny", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gptoss-cluster: error: ") and "--force" in err and err.count("\n") == 1


def test_cli_original_layout_with_force(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    args = ["make-checkpoint", "--layout", "original", "--out", str(out), "--max-shard-size", "40M"]
    assert main(args) == 0
    assert main([*args, "--force", "--seed", "2"]) == 0
    with open_checkpoint(out) as r:
        assert r.layout == "original" and len(list(out.glob("*.safetensors"))) > 1


@pytest.mark.parametrize(
    "argv",
    [
        ["make-checkpoint", "--preset", "7b", "--out", "x"],
        ["make-checkpoint", "--layout", "gguf", "--out", "x"],
        ["make-checkpoint", "--seed", "abc", "--out", "x"],
        ["make-checkpoint", "--preset", "tiny"],
        ["make-checkpoint", "--out", "x", "--max-shard-size", "lots"],
        ["no-such-command"],
        [],
    ],
)
def test_cli_bad_arguments(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("gptoss-cluster: error: ") and err.count("\n") == 1
