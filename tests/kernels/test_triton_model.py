"""The whole gpt-oss forward through the Triton kernels matches the torch reference path (tiny random model, CPU,
Triton interpreter), through the contiguous KV cache and through a paged one; and the dispatch point."""

from __future__ import annotations

import pytest
import torch

from gptoss_cluster.kernels.dispatch import select_kernels
from gptoss_cluster.workers.config import ModelConfig
from gptoss_cluster.workers.model import GptOssModel

CONFIG = ModelConfig.preset("tiny", num_hidden_layers=2, vocab_size=2048, eos_token_id=1, pad_token_id=0)


def random_model(dtype: torch.dtype, seed: int = 0) -> GptOssModel:
    g = torch.Generator().manual_seed(seed)
    model = GptOssModel(CONFIG, dtype=dtype, kernels=select_kernels("cpu", backend="torch"))
    for name, buf in model.named_buffers():
        if name == "inv_freq":
            continue
        if buf.dtype == torch.uint8:
            low, high = (118, 124) if name.endswith("scales") else (0, 256)
            buf.copy_(torch.randint(low, high, buf.shape, generator=g, dtype=torch.uint8))
        elif name.endswith("norm_weight"):
            buf.copy_(1 + 0.1 * torch.randn(buf.shape, generator=g))
        elif name.endswith("sinks") or name == "embedding":
            buf.copy_(torch.randn(buf.shape, generator=g))
        else:
            fan_in = buf.shape[-1] if buf.dim() > 1 else 16
            buf.copy_(torch.randn(buf.shape, generator=g) / fan_in**0.5)
    return model.eval()


class PagedStore:
    """A minimal paged KVStore (one sequence, shuffled pages of 4) calling kernels.paged_attention."""

    def __init__(self, model: GptOssModel, page: int = 4, pages: int = 16):
        shape = (pages, page, model.attention[0].num_kv_heads, CONFIG.head_dim)
        self.k = [torch.zeros(shape, dtype=model.dtype) for _ in range(CONFIG.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=model.dtype) for _ in range(CONFIG.num_hidden_layers)]
        self.table = torch.randperm(pages, generator=torch.Generator().manual_seed(1))[None].int()
        self.page, self.length = page, 0

    def attend(self, kernels, layer, q, k, v, positions, sinks, sliding_window, scale):
        for i, p in enumerate(positions.tolist()):
            block = int(self.table[0, p // self.page])
            self.k[layer][block, p % self.page] = k[i]
            self.v[layer][block, p % self.page] = v[i]
        stop = int(positions[-1]) + 1
        qsl = torch.tensor([0, q.shape[0]], dtype=torch.int32)
        return kernels.paged_attention(q, self.k[layer], self.v[layer], self.table, qsl,
                                       torch.tensor([stop], dtype=torch.int32), sinks, sliding_window, scale)

    def positions(self, n):
        return torch.arange(self.length, self.length + n)

    def advance(self, n):
        self.length += n


def generate(model: GptOssModel, backend: str, prompt: list[int], steps: int, paged: bool):
    model.kernels = select_kernels("cpu", backend=backend)
    kv = PagedStore(model) if paged else model.new_kv_cache(capacity=8)
    tokens, all_logits = list(prompt), []
    ids = torch.tensor(prompt)
    for _ in range(steps):
        positions = kv.positions(len(ids))
        logits = model.forward(ids, positions, kv, torch.tensor([len(ids) - 1]))
        kv.advance(len(ids))
        all_logits.append(logits[0])
        tokens.append(int(logits[0].argmax()))
        ids = torch.tensor(tokens[-1:])
    return tokens, torch.stack(all_logits)


@pytest.mark.usefixtures("run_kernels")
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_fp32_model_greedy_tokens_identical(paged):
    model = random_model(torch.float32)
    prompt = [5, 17, 300, 42, 7, 1999, 64, 3, 11]  # crosses the 4-token pages; window 128 > context
    ref_tokens, ref_logits = generate(model, "torch", prompt, 2, paged)  # prefill, then one decode step
    tokens, logits = generate(model, "triton", prompt, 2, paged)
    assert tokens == ref_tokens
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.usefixtures("run_kernels")
def test_bf16_model_logits_within_tolerance():
    """bf16 logits of both paths measured against the fp32 forward of the same (bf16-representable) weights: the
    Triton path (fp32 accumulation throughout) is no further from it than the bf16 reference is."""
    model = random_model(torch.bfloat16, seed=2)
    truth_model = random_model(torch.float32, seed=2)
    for (_, b16), (_, b32) in zip(model.named_buffers(), truth_model.named_buffers(), strict=True):
        b32.copy_(b16.to(b32.dtype))
    prompt = [9, 8, 7, 6, 5]
    _, truth = generate(truth_model, "torch", prompt, 2, paged=False)
    _, ref_logits = generate(model, "torch", prompt, 2, paged=False)
    _, logits = generate(model, "triton", prompt, 2, paged=False)
    scale = truth.abs().max()
    ref_err = (ref_logits - truth).abs().max() / scale
    err = (logits - truth).abs().max() / scale
    assert err < max(2 * ref_err, 3e-2), f"relative logit error {err:.3g} (bf16 reference: {ref_err:.3g})"


# ---------------------------------------------------------------------------------------------------- dispatch
@pytest.mark.interpreter_only
@pytest.mark.usefixtures("run_kernels")
def test_select_triton_on_cpu_under_the_interpreter(monkeypatch):
    kernels = select_kernels("cpu", backend="triton")
    assert kernels.name == "triton"
    from gptoss_cluster.kernels import dispatch
    from gptoss_cluster.kernels import triton as tk

    assert dispatch.TRITON_KERNELS is kernels
    assert kernels.moe_experts is tk.moe_experts and kernels.paged_attention is tk.paged_attention
    monkeypatch.setenv("GPTOSS_KERNELS", "triton")
    assert select_kernels("cpu").name == "triton"


@pytest.mark.usefixtures("compiler")
def test_triton_on_cpu_without_the_interpreter_is_refused(monkeypatch):
    with pytest.raises(ValueError, match="CUDA"):
        select_kernels("cpu", backend="triton")
    monkeypatch.delenv("GPTOSS_KERNELS", raising=False)
    assert select_kernels("cpu").name == "torch"
    from gptoss_cluster.kernels.triton import rms_norm

    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        rms_norm(torch.ones(2, 4), torch.ones(4), 1e-5)
