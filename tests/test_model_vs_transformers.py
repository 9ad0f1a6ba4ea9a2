"""Our forward against Hugging Face transformers' GptOssForCausalLM, the executable reference (test oracle only)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from gptoss_cluster import LLM, SamplingParams

transformers = pytest.importorskip("transformers")


def load_hf(path):
    model = transformers.GptOssForCausalLM.from_pretrained(
        path, quantization_config=transformers.Mxfp4Config(dequantize=True), dtype=torch.float32,
        attn_implementation="eager",
    )
    return model.eval()


def random_ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 200_000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("name, length", [("tiny-hf", 300), ("tinyb-hf", 150)])
def test_logits_match_transformers(checkpoints, name, length):
    llm = LLM(checkpoints[name], dtype="float32", progress=False)
    window = llm.config.sliding_window
    assert length > window  # sliding layers must actually slide
    ids = random_ids(length, seed=length)
    ours = llm.forward_logits(ids)
    with torch.no_grad():
        ref = load_hf(checkpoints[name])(torch.tensor([ids])).logits[0].float()
    assert ours.dtype == torch.float32 and ours.shape == (length, 201088)
    assert ref.std() > 0.5  # outputs depend on the weights, not a flat distribution
    assert (ours - ref).abs().max().item() <= 1e-3


def test_both_layouts_give_identical_logits(checkpoints):
    ids = random_ids(200, seed=7)
    hf_layout = LLM(checkpoints["tiny-hf"], dtype="float32", progress=False).forward_logits(ids)
    original = LLM(checkpoints["tiny-original"], dtype="float32", progress=False).forward_logits(ids)
    assert torch.equal(hf_layout, original)


def test_greedy_generation_matches_transformers(checkpoints):
    path = checkpoints["tiny-hf"]
    prompt = random_ids(140, seed=3)  # past the window, so decode crosses it too
    llm = LLM(path, dtype="float32", progress=False)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))[0]
    with torch.no_grad():
        ref = load_hf(path).generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=32, min_new_tokens=32)
    assert out.finish_reason == "length"
    assert out.token_ids == ref[0, len(prompt):].tolist()


def test_bf16_close_to_float32(checkpoints):
    ids = random_ids(64, seed=11)
    fp32 = LLM(checkpoints["tiny-hf"], dtype="float32", progress=False).forward_logits(ids)
    bf16 = LLM(checkpoints["tiny-hf"], dtype="bfloat16", progress=False).forward_logits(ids)
    assert bf16.dtype == torch.float32
    # bf16 keeps ~3 significant digits: every row points the same way, errors are a few % of the logit spread
    assert torch.nn.functional.cosine_similarity(fp32, bf16, dim=-1).min().item() > 0.95
    assert (fp32 - bf16).abs().mean().item() < 0.1 * fp32.std().item()


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints written by transformers itself: transformers 5 config fields (null token ids, generic PretrainedConfig
# fields) and experts stored as float parameters ([E, H, 2I] / [E, I, H]) instead of MXFP4 blocks and scales.
def transformers_model(seed: int = 0, mxfp4_values: bool = True):
    """A small seeded GptOssForCausalLM (H 64 != I 96, so a transposed expert would not fit).

    With `mxfp4_values`, the expert weights are rounded to MXFP4 values, as in a dequantized save of the published
    model: our loader's quantization is then exact and the logits must agree to float32 rounding.
    """
    from gptoss_cluster.kernels.mxfp4 import dequantize_mxfp4, quantize_mxfp4

    config = transformers.GptOssConfig(
        num_hidden_layers=3, num_local_experts=4, num_experts_per_tok=2, vocab_size=201088, hidden_size=64,
        intermediate_size=96, head_dim=16, num_attention_heads=4, num_key_value_heads=2, sliding_window=8,
        initializer_range=0.2, attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = transformers.GptOssForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("norm.weight", "_bias", ".bias")):
                param.normal_(1.0 if "norm" in name else 0.0, 0.2)  # not the init's ones and zeros
            if mxfp4_values and name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                rows = param.transpose(1, 2)  # [E, out, in]: MXFP4 blocks run along the input features
                param.copy_(dequantize_mxfp4(*quantize_mxfp4(rows)).transpose(1, 2))
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transformers_saved_checkpoint_loads_and_matches(tmp_path, dtype):
    model = transformers_model().to(dtype)
    model.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["eos_token_id"] is None and written["pad_token_id"] is None  # what transformers 5 writes
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert "model.layers.0.mlp.experts.gate_up_proj" in f.keys()  # float experts, no *_blocks

    llm = LLM(model=str(tmp_path), dtype="float32", progress=False)
    assert (llm.config.eos_token_id, llm.config.pad_token_id) == (200002, 199999)
    ids = random_ids(40, seed=5)  # past the 8-token window
    ours = llm.forward_logits(ids)
    # transformers reads its own files back (an in-memory bf16 model would also have rounded its RoPE buffers)
    hf = transformers.GptOssForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        ref = hf.eval()(torch.tensor([ids])).logits[0]
    assert ref.std() > 0.5
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-4)


def test_float_experts_off_the_mxfp4_grid_are_rounded_and_logged(tmp_path, caplog):
    from gptoss_cluster.kernels.mxfp4 import quantize_mxfp4
    from gptoss_cluster.workers.checkpoint import open_checkpoint

    model = transformers_model(mxfp4_values=False)  # a fine-tune's weights: any float
    model.save_pretrained(tmp_path)
    with caplog.at_level("WARNING"), open_checkpoint(tmp_path) as reader:
        name = "model.layers.1.mlp.experts.down_proj"
        assert reader.shape(name + "_blocks") == (4, 64, 3, 16) and reader.dtype(name + "_scales") == torch.uint8
        scales = reader.read(name + "_scales", (slice(1, 3),))
        blocks = reader.read(name + "_blocks", (slice(1, 3),))
    expected = quantize_mxfp4(model.model.layers[1].mlp.experts.down_proj.detach()[1:3].transpose(1, 2))
    assert torch.equal(blocks, expected[0]) and torch.equal(scales, expected[1])
    assert "not MXFP4 values" in caplog.text
