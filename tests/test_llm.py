"""The offline API: prompts of every kind, sampling, stopping, and clear errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from gptoss_cluster import LLM, SamplingParams
from gptoss_cluster.workers.checkpoint import CheckpointError
from gptoss_cluster.workers.config import ConfigError
from gptoss_cluster.workers.harmony import get_tokenizer


@pytest.fixture(scope="module")
def llm(checkpoints):
    return LLM(checkpoints["tiny-hf"], dtype="float32", progress=False)


def test_generate_text_ids_and_chat(llm):
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    text_out, ids_out = llm.generate(["The capital of France is", [200006, 1428, 200008, 12194]], greedy)
    assert len(text_out.token_ids) == 8 and text_out.finish_reason == "length"
    assert text_out.prompt_token_ids == get_tokenizer().encode("The capital of France is")
    assert text_out.text == get_tokenizer().decode(text_out.token_ids)
    assert ids_out.prompt_token_ids == [200006, 1428, 200008, 12194]
    chat = [{"role": "user", "content": "What is 2+2?"}]
    chat_out = llm.generate([chat], greedy)[0]
    assert chat_out.prompt_token_ids[-2:] == [200006, get_tokenizer().encode("assistant")[0]]
    # one prompt on its own is accepted as well as a list of one
    assert llm.generate("The capital of France is", greedy)[0].token_ids == text_out.token_ids


def test_greedy_is_deterministic_and_seed_reproducible(llm):
    prompt = "Once upon a time"
    sampled = SamplingParams(temperature=1.0, max_tokens=12, seed=1234, ignore_eos=True)
    a, b = llm.generate([prompt, prompt], sampled)
    assert a.token_ids == b.token_ids
    other = llm.generate([prompt], SamplingParams(temperature=1.0, max_tokens=12, seed=99, ignore_eos=True))[0]
    assert other.token_ids != a.token_ids
    per_prompt = llm.generate([prompt, prompt], [SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                                                 SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)])
    assert [len(o.token_ids) for o in per_prompt] == [4, 2]
    assert per_prompt[1].token_ids == per_prompt[0].token_ids[:2]


def test_top_k_one_equals_greedy(llm):
    greedy = llm.generate(["abc"], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
    top1 = llm.generate(["abc"], SamplingParams(temperature=0.8, top_k=1, seed=5, max_tokens=6, ignore_eos=True))[0]
    assert top1.token_ids == greedy.token_ids


class ScriptedModel(torch.nn.Module):
    """Stands in for the network: whatever the input, the next token is the next one of a script."""

    def __init__(self, real, script):
        super().__init__()
        self.real, self.script, self.calls = real, list(script), 0

    def forward(self, token_ids, positions, kv, logits_at):
        self.real(token_ids, positions, kv, logits_at)  # keep the cache bookkeeping real
        logits = torch.full((len(logits_at), self.real.config.vocab_size), -10.0)
        logits[:, self.script[min(self.calls, len(self.script) - 1)]] = 10.0
        self.calls += 1
        return logits

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.real, name)


def test_chat_stops_on_return_not_end(checkpoints):
    tok = get_tokenizer()
    text = ("<|channel|>analysis<|message|>Think.<|end|><|start|>assistant<|channel|>final<|message|>Four."
            "<|return|>")
    script = tok.encode(text, allow_special_tokens=True) + tok.encode(" never reached")
    llm = LLM(checkpoints["tiny-hf"], dtype="float32", progress=False)
    llm.engine.executor.model = ScriptedModel(llm.model, script)
    out = llm.generate([[{"role": "user", "content": "2+2?"}]], SamplingParams(temperature=0, max_tokens=64))[0]
    assert tok.token_id("<|end|>") in out.token_ids  # went on past <|end|>
    assert out.token_ids[-1] == tok.token_id("<|return|>") and out.finish_reason == "stop"
    assert [(m.channel, m.text) for m in out.messages] == [("analysis", "Think."), ("final", "Four.")]


def test_forward_logits_shape_and_prefix_consistency(llm):
    ids = [1, 2, 3, 4, 5, 6]
    full = llm.forward_logits(ids)
    assert full.shape == (6, 201088) and full.dtype == torch.float32
    assert torch.allclose(llm.forward_logits(ids[:3]), full[:3], atol=1e-4)


@pytest.mark.parametrize("prompt, message", [
    ("", "empty"),
    ([], "empty"),
    ([1, 2, 201088], "outside the vocabulary"),
    ([1, -1], "outside the vocabulary"),
    ([[{"role": "wizard", "content": "hi"}]], "unknown role"),
])
def test_bad_prompts(llm, prompt, message):
    with pytest.raises(ValueError, match=message):
        llm.generate([prompt] if not (isinstance(prompt, list) and prompt and isinstance(prompt[0], list)) else
                     prompt, SamplingParams(max_tokens=2))


def test_bad_forward_logits_and_sampling(llm):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.forward_logits([5, 300000])
    with pytest.raises(ValueError, match="empty"):
        llm.forward_logits([])
    for bad in ({"temperature": -1}, {"top_p": 0}, {"top_k": -2}, {"max_tokens": 0}, {"max_tokens": -3}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingParams(**bad)
    with pytest.raises(ValueError, match="exceed the context"):
        llm.generate(["hi"], SamplingParams(max_tokens=llm.config.max_position_embeddings))
    with pytest.raises(ValueError, match="dtype"):
        LLM("/nonexistent", dtype="float8")


def test_bad_checkpoints(tmp_path, checkpoints):
    with pytest.raises(CheckpointError, match="nonexistent"):
        LLM(tmp_path / "nonexistent")
    broken = tmp_path / "broken"
    broken.mkdir()
    config = json.loads((checkpoints["tiny-hf"] / "config.json").read_text())
    config["num_attention_heads"] = "eight"
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="num_attention_heads"):
        LLM(broken)


def test_cli_generate_offline(checkpoints, capsys, tmp_path):
    from gptoss_cluster.cluster.cli import main

    code = main(["generate", "--model", str(checkpoints["tiny-hf"]), "--prompt", "Hello", "--max-tokens", "3",
                 "--temperature", "0", "--ignore-eos", "--dtype", "float32"])
    out = capsys.readouterr()
    assert code == 0 and "3 completion tokens" in out.err
    llm_text = LLM(checkpoints["tiny-hf"], dtype="float32", progress=False).generate(
        "Hello", SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))[0].text
    assert out.out.rstrip("\n") == llm_text
    assert main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert main(["generate", "--model", str(checkpoints["tiny-hf"]), "--prompt", "x", "--temperature", "-1"]) == 2


# The child's own peak: VmHWM (this process image's high-water mark). Not ru_maxrss, which Linux carries over from
# the forked parent across exec, so a large pytest process (after the transformers / PEFT tests) would show as the
# child's peak.
PEAK_RSS_SCRIPT = """
import sys
from gptoss_cluster import LLM, SamplingParams
llm = LLM(sys.argv[1], progress=False)
llm.generate(["Hello", "The capital of France is"], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
hwm_kib = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(llm.engine.num_kv_blocks, hwm_kib * 1024)
"""


def test_llm_on_cpu_takes_ram_for_what_it_uses(checkpoints):
    """No settings: the KV pool is sized by what the engine can hold (4 GiB at most on CPU, not half the free RAM,
    which was 11 GiB of 12 GiB peak on a 24 GiB machine) and takes RAM only as blocks fill (~0.6 GiB in all)."""
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS_SCRIPT, str(checkpoints["tiny-hf"])], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    blocks, peak = map(int, proc.stdout.split()[-2:])
    assert blocks > 0 and peak < 2 * 2**30, f"peak RSS {peak / 2**30:.2f} GiB with {blocks} KV blocks"
