"""Our forward against Hugging Face transformers' GptOssForCausalLM, the executable reference (test oracle only)."""

from __future__ import annotations

import pytest
import torch

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
