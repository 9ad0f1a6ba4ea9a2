"""LoRA adapters (workers/lora) against PEFT itself: adapters made with `peft.get_peft_model` on the test checkpoints
(attention q/k/v/o and the experts' gate_up_proj / down_proj through `target_parameters`), their A and B randomized
with a seeded generator (PEFT starts B at zero), saved with `save_pretrained`; then our float32 logits with each
adapter against the PEFT model's, over every position of a prompt; a step mixing three adapters and base rows; the
same step split over two gloo shards (TP heads / EP experts); and the options we refuse."""

from __future__ import annotations

import json
import multiprocessing
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from gptoss_cluster.workers.checkpoint import open_checkpoint  # noqa: E402
from gptoss_cluster.workers.engine.executor import LocalExecutor, StepPlan  # noqa: E402
from gptoss_cluster.workers.engine.kv_cache import KVCacheLayout  # noqa: E402
from gptoss_cluster.workers.lora import (  # noqa: E402
    LoraBatch,
    LoraError,
    LoraPool,
    LoraSource,
    load_adapter,
    read_adapter,
)
from gptoss_cluster.workers.model import GptOssModel  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
PROMPT_LENGTHS = (40, 23, 31, 17)  # the mixed batch's requests; the first is the ~40-token single-adapter prompt


def load_hf(path: Path):
    model = transformers.GptOssForCausalLM.from_pretrained(
        path, quantization_config=transformers.Mxfp4Config(dequantize=True), dtype=torch.float32,
        attn_implementation="eager")
    return model.eval()


def prompts(n: int = len(PROMPT_LENGTHS)) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 200_000, (length,), generator=g).tolist() for length in PROMPT_LENGTHS[:n]]


@torch.no_grad()
def hf_logits(model, token_ids: list[int]) -> torch.Tensor:
    return model(input_ids=torch.tensor([token_ids])).logits[0].float()


@dataclass
class Adapter:
    source: LoraSource
    logits: list[torch.Tensor]  # PEFT's logits [len, vocab] for each of `prompts()`, every position


def make_adapter(checkpoint: Path, out_dir: Path, seed: int, scale: float = 0.05, logits: bool = True,
                 **config) -> Adapter:
    """A PEFT adapter on `checkpoint` with seeded random A and B, saved to `out_dir`, and PEFT's logits."""
    model = peft.get_peft_model(load_hf(checkpoint), peft.LoraConfig(**config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=g) * scale)
    model.save_pretrained(out_dir)
    model.eval()
    return Adapter(LoraSource(out_dir.name, str(out_dir)), [hf_logits(model, p) for p in prompts()] if logits else [])


# The adapters of the tests, on tinyb-hf (H 256 != I 128: a transposed A or B does not fit):
ADAPTERS = {
    # everything, on layers 0 and 2 (layers_to_transform applies to target_modules; PEFT puts the expert LoRA on
    # every layer)
    "full": dict(seed=1, r=4, lora_alpha=8, target_modules=ATTENTION, target_parameters=EXPERTS,
                 layers_to_transform=[0, 2]),
    # rsLoRA: alpha / sqrt(r); only q, v and one expert parameter
    "rslora": dict(seed=2, r=8, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "v_proj"],
                   target_parameters=["mlp.experts.down_proj"]),
    # per-module ranks and alphas; the experts of layer 1 only
    "pattern": dict(seed=3, r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "o_proj"],
                    target_parameters=["model.layers.1.mlp.experts.gate_up_proj"],
                    rank_pattern={"o_proj": 2, "model.layers.1.mlp.experts.gate_up_proj": 6},
                    alpha_pattern={"k_proj": 32, "layers.0.self_attn.q_proj": 3}),
    # OpenAI's gpt-oss fine-tuning cookbook style: every linear layer, experts of chosen layers by number
    "cookbook": dict(seed=4, r=8, lora_alpha=16, target_modules="all-linear",
                     target_parameters=["1.mlp.experts.gate_up_proj", "1.mlp.experts.down_proj",
                                        "2.mlp.experts.down_proj"]),
}


@pytest.fixture(scope="module")
def tinyb(checkpoints, tmp_path_factory):
    """tinyb-hf: our float32 model, PEFT's base logits, and the ADAPTERS built on it."""
    path = checkpoints["tinyb-hf"]
    base = load_hf(path)
    base_logits = [hf_logits(base, p) for p in prompts()]
    root = tmp_path_factory.mktemp("adapters")
    adapters = {name: make_adapter(path, root / name, **spec) for name, spec in ADAPTERS.items()}
    with open_checkpoint(path) as reader:
        model = GptOssModel.from_checkpoint(reader, dtype=torch.float32, progress=False)
    return {"path": path, "model": model, "base": base_logits, "adapters": adapters, "root": root}


def forward(model: GptOssModel, token_ids: list[int], lora: LoraBatch | None = None) -> torch.Tensor:
    """Every position's logits of one sequence over a contiguous KVCache."""
    kv = model.new_kv_cache()
    n = len(token_ids)
    return model(torch.tensor(token_ids), kv.positions(n), kv, torch.arange(n), lora=lora)


# ---------------------------------------------------------------------------------------------------- one adapter
@pytest.mark.parametrize("name", list(ADAPTERS))
def test_one_adapter_matches_peft(tinyb, name):
    model, adapter = tinyb["model"], tinyb["adapters"][name]
    weights = load_adapter(adapter.source, model.config, model.shard, 16, torch.float32, "cpu")
    ours = forward(model, prompts()[0], LoraBatch.single(weights))
    base = tinyb["base"][0]
    assert (adapter.logits[0] - base).abs().max() > 1e-2  # the adapter visibly changes the logits
    assert (forward(model, prompts()[0]) - base).abs().max() < 1e-4  # and the base path is the base
    torch.testing.assert_close(ours, adapter.logits[0], rtol=0, atol=1e-4)


def test_bfloat16_model_applies_the_adapter(tinyb):
    """The serving dtype: the adapter's slices in bfloat16; the logits land near PEFT's float32 ones, much closer
    than the base model's are (bfloat16 rounding, not a missed module)."""
    with open_checkpoint(tinyb["path"]) as reader:
        model = GptOssModel.from_checkpoint(reader, dtype=torch.bfloat16, progress=False)
    adapter = tinyb["adapters"]["full"]
    weights = load_adapter(adapter.source, model.config, model.shard, 16, torch.bfloat16, "cpu")
    assert all(t.dtype == torch.bfloat16 for layer in weights.layers for t in layer.tensors())
    ours = forward(model, prompts()[0], LoraBatch.single(weights))
    # mean over positions and vocabulary: a random tiny model in bfloat16 is off by a few units at its worst logits
    error = (ours - adapter.logits[0]).abs().mean()
    assert error < 0.1 * (tinyb["base"][0] - adapter.logits[0]).abs().mean(), error


def test_tiny_square_model_matches_peft(checkpoints, tmp_path):
    """tiny-hf (H = I = 192): every module, all layers; here only the shapes of B tell gate_up from down."""
    path = checkpoints["tiny-hf"]
    adapter = make_adapter(path, tmp_path / "sq", seed=5, r=3, lora_alpha=6, target_modules=ATTENTION,
                           target_parameters=EXPERTS)
    with open_checkpoint(path) as reader:
        model = GptOssModel.from_checkpoint(reader, dtype=torch.float32, progress=False)
    info = read_adapter(adapter.source, model.config, max_lora_rank=3, dtype=torch.float32)
    assert info.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj")
    assert info.layers == tuple(range(model.config.num_hidden_layers))
    weights = load_adapter(adapter.source, model.config, model.shard, 3, torch.float32, "cpu")
    assert weights.num_bytes == info.num_bytes
    torch.testing.assert_close(forward(model, prompts()[0], LoraBatch.single(weights)), adapter.logits[0],
                               rtol=0, atol=1e-4)


def test_adapter_info_reads_ranks_scaling_and_layers(tinyb):
    model, adapters = tinyb["model"], tinyb["adapters"]
    full = read_adapter(adapters["full"].source, model.config, 16, dtype=torch.float32)
    assert (full.rank, full.lora_alpha, full.use_rslora) == (4, 8, False)
    assert full.layers == (0, 1, 2) and full.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj",
                                                                "gate_up_proj", "down_proj")
    rs = read_adapter(adapters["rslora"].source, model.config, 16)
    assert rs.use_rslora and rs.target_modules == ("q_proj", "v_proj", "down_proj")
    pattern = read_adapter(adapters["pattern"].source, model.config, 16)
    assert pattern.rank == 6 and pattern.target_modules == ("q_proj", "k_proj", "o_proj", "gate_up_proj")
    # the expert LoRA sits on layer 1 alone: layers 0 and 2 have attention LoRA only
    weights = load_adapter(adapters["pattern"].source, model.config, model.shard, 16, torch.float32, "cpu")
    assert [layer.has_experts for layer in weights.layers] == [False, True, False]
    assert weights.layers[1].gate_up_a.shape == (model.config.num_experts, 6, model.config.hidden_size)
    assert weights.layers[0].o_a.shape[0] == 2
    # "all-linear" (a string in the config): the tensors say q, k, v, o; experts on layers 1 (both) and 2 (down)
    cookbook = load_adapter(adapters["cookbook"].source, model.config, model.shard, 16, torch.float32, "cpu")
    assert [(layer.gate_up_a is not None, layer.down_a is not None) for layer in cookbook.layers] == [
        (False, False), (True, True), (False, True)]
    assert cookbook.info.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj")
    # bf16 counts 2 bytes per parameter, the float32 model 4
    assert pattern.num_bytes * 2 == read_adapter(adapters["pattern"].source, model.config, 16,
                                                 dtype=torch.float32).num_bytes


def test_scaling_is_applied_not_ignored(tinyb, tmp_path):
    """rsLoRA and the alpha pattern matter: the same tensors under plain alpha / r give other logits."""
    model, adapter = tinyb["model"], tinyb["adapters"]["rslora"]
    plain = tmp_path / "plain"
    shutil.copytree(adapter.source.path, plain)
    config = json.loads((plain / "adapter_config.json").read_text())
    config["use_rslora"] = False
    (plain / "adapter_config.json").write_text(json.dumps(config))
    weights = load_adapter(LoraSource("plain", str(plain)), model.config, model.shard, 16, torch.float32, "cpu")
    assert (forward(model, prompts()[0], LoraBatch.single(weights)) - adapter.logits[0]).abs().max() > 1e-3


class AddOnes:
    """An ExpertLora that adds 0.5 to expert 1's gate_up rows and 0.25 to its down rows."""

    def add_gate_up(self, expert, token_idx, x, out):
        if expert == 1:
            out += 0.5

    def add_down(self, expert, token_idx, hidden, out):
        if expert == 1:
            out += 0.25


def test_moe_experts_lora_hook_in_every_backend(tinyb):
    """The hook lands where it should (only tokens routed to expert 1 change), in the reference, the executor's
    dequantize-once MoE and the Triton entry point (which runs the reference path when a hook is given)."""
    from gptoss_cluster.kernels import reference
    from gptoss_cluster.workers.engine.experts import DequantizedMoE

    mlp, cfg = tinyb["model"].mlp[0], tinyb["model"].config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, cfg.hidden_size, generator=g)
    weights, ids = reference.route(torch.randn(12, cfg.num_experts, generator=g), cfg.experts_per_token)
    args = (x, weights, ids, mlp.gate_up_blocks, mlp.gate_up_scales, mlp.gate_up_bias, mlp.down_blocks,
            mlp.down_scales, mlp.down_bias, cfg.swiglu_limit, cfg.swiglu_alpha)
    base = reference.moe_experts(*args)
    hooked = reference.moe_experts(*args, lora=AddOnes())
    changed = (hooked != base).any(-1)
    assert torch.equal(changed, (ids == 1).any(-1)) and changed.any()
    assert torch.equal(DequantizedMoE()(*args, lora=AddOnes()), hooked)
    assert torch.equal(DequantizedMoE()(*args), base)
    tk = pytest.importorskip("gptoss_cluster.kernels.triton")
    assert torch.equal(tk.moe_experts(*args, lora=AddOnes()), hooked)


# ---------------------------------------------------------------------------------------------------- a mixed step
def paged_plan(layout: KVCacheLayout, seqs: list[list[int]], starts: list[int], lora_slots: list[int] | None,
               max_blocks: int = 8) -> StepPlan:
    """One step over requests whose new tokens `seqs[r]` start at position `starts[r]`; request r owns block ids
    (g * R + r) * max_blocks + k of KV group g. Logits at every row."""
    bs, num = layout.block_size, len(seqs)
    positions = torch.cat([torch.arange(s, s + len(t)) for t, s in zip(seqs, starts, strict=True)])
    owner = torch.cat([torch.full((len(t),), r) for r, t in enumerate(seqs)])
    tables, slots = [], []
    for g in range(len(layout.groups)):
        table = torch.tensor([[(g * num + r) * max_blocks + k for k in range(max_blocks)] for r in range(num)],
                             dtype=torch.int32)
        tables.append(table)
        slots.append(table[owner, positions // bs].long() * bs + positions % bs)
    qsl = torch.tensor([0] + [len(t) for t in seqs]).cumsum(0).to(torch.int32)
    return StepPlan(token_ids=torch.tensor([t for s in seqs for t in s]), positions=positions, query_start_loc=qsl,
                    seq_lens=torch.tensor([s + len(t) for t, s in zip(seqs, starts, strict=True)], dtype=torch.int32),
                    block_tables=tables, slot_mappings=slots, logits_indices=torch.arange(len(positions)),
                    lora_slots=None if lora_slots is None else torch.tensor(lora_slots, dtype=torch.int32))


MIXED = ["full", None, "pattern", "rslora"]  # request r's adapter (None = base)
SLOTS = {"pattern": 0, "full": 2, "rslora": 3}  # pool slots, out of registration order


def run_mixed(executor: LocalExecutor, config, names: list[str | None], which: list[int], forward) -> list:
    """Prefill prompts()[which] with adapters `names`, then one decode step of each request's prefill argmax token;
    returns per request the logits of its prompt rows and of its decode row. `forward`: plan -> logits."""
    layout = KVCacheLayout.from_model_config(config, block_size=16)
    executor.initialize_cache(layout, num_blocks=len(layout.groups) * len(names) * 8)
    seqs = [prompts()[i] for i in which]
    slots = [-1 if n is None else SLOTS[n] for n in names]
    lora_slots = slots if any(s >= 0 for s in slots) else None
    prefill = forward(paged_plan(layout, seqs, [0] * len(seqs), lora_slots))
    bounds = torch.tensor([0] + [len(s) for s in seqs]).cumsum(0).tolist()
    rows = [prefill[bounds[i]:bounds[i + 1]] for i in range(len(seqs))]
    next_tokens = [[int(r[-1].argmax())] for r in rows]
    decode = forward(paged_plan(layout, next_tokens, [len(s) for s in seqs], lora_slots))
    return [(rows[i], decode[i], next_tokens[i][0]) for i in range(len(seqs))]


def local_executor(model: GptOssModel, adapters: dict) -> LocalExecutor:
    executor = LocalExecutor(model, count_expert_tokens=False, max_loras=4, max_lora_rank=16)
    for name, slot in SLOTS.items():
        executor.add_lora(slot, adapters[name].source)
    return executor


def test_mixed_batch_gives_each_row_its_own_logits(tinyb):
    model, adapters = tinyb["model"], tinyb["adapters"]
    executor = local_executor(model, adapters)
    assert executor.lora_bytes() == sum(load_adapter(adapters[n].source, model.config, model.shard, 16,
                                                     torch.float32, "cpu").num_bytes for n in SLOTS)
    mixed = run_mixed(executor, model.config, MIXED, [0, 1, 2, 3], executor.forward_logits)
    hf_base = load_hf(tinyb["path"])
    for r, name in enumerate(MIXED):
        alone = run_mixed(executor, model.config, [name], [r], executor.forward_logits)[0]
        rows, decode, token = mixed[r]
        torch.testing.assert_close(rows, alone[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(decode, alone[1], rtol=0, atol=1e-5)
        want = tinyb["base"][r] if name is None else adapters[name].logits[r]
        torch.testing.assert_close(rows, want, rtol=0, atol=1e-4)
        if name is None:  # the decode row against transformers over prompt + token
            torch.testing.assert_close(decode, hf_logits(hf_base, prompts()[r] + [token])[-1], rtol=0, atol=1e-4)


def test_decode_row_matches_peft_over_prompt_and_token(tinyb):
    """The adapter's k/v deltas stored in the paged cache serve the next step: one decode row against PEFT."""
    model, adapters = tinyb["model"], tinyb["adapters"]
    executor = local_executor(model, adapters)
    _, decode, token = run_mixed(executor, model.config, ["full"], [0], executor.forward_logits)[0]
    peft_model = peft.PeftModel.from_pretrained(load_hf(tinyb["path"]), adapters["full"].source.path)
    torch.testing.assert_close(decode, hf_logits(peft_model.eval(), prompts()[0] + [token])[-1], rtol=0, atol=1e-4)


def test_no_adapter_in_the_step_is_the_base_path(tinyb):
    """lora_slots None or all -1: no LoraBatch, the same logits bit for bit as a plan without the field."""
    model = tinyb["model"]
    pool = LoraPool(2)
    assert pool.batch(None, torch.tensor([0, 5]), "cpu") is None
    assert pool.batch(torch.tensor([-1, -1]), torch.tensor([0, 5, 9]), "cpu") is None
    executor = local_executor(model, tinyb["adapters"])
    plain = run_mixed(executor, model.config, [None, None], [0, 1], executor.forward_logits)
    layout = KVCacheLayout.from_model_config(model.config, block_size=16)
    executor.initialize_cache(layout, num_blocks=len(layout.groups) * 2 * 8)
    explicit = executor.forward_logits(paged_plan(layout, prompts()[:2], [0, 0], [-1, -1]))
    assert torch.equal(explicit, torch.cat([plain[0][0], plain[1][0]]))


def test_pool_refuses_bad_slots(tinyb):
    model, adapters = tinyb["model"], tinyb["adapters"]
    executor = LocalExecutor(model, count_expert_tokens=False, max_loras=2)
    with pytest.raises(LoraError, match="slot 2"):
        executor.add_lora(2, adapters["full"].source)
    executor.add_lora(1, adapters["full"].source)
    layout = KVCacheLayout.from_model_config(model.config, block_size=16)
    executor.initialize_cache(layout, num_blocks=len(layout.groups) * 8)
    with pytest.raises(LoraError, match="slot 0 holds no adapter"):
        executor.forward_logits(paged_plan(layout, prompts()[:1], [0], [0]))
    executor.remove_lora(1)
    assert executor.lora_bytes() == 0
    with pytest.raises(LoraError, match="slot 1 holds no adapter"):
        executor.forward_logits(paged_plan(layout, prompts()[:1], [0], [1]))


# ---------------------------------------------------------------------------------------------------- G = 2 (gloo)
def _shard_rank(rank: int, port: int, checkpoint: str, sources: dict, results) -> None:
    """One of two processes: rank `rank` of the tinyb model with the adapters' slices, the mixed step."""
    try:
        from gptoss_cluster.workers.parallel import destroy_process_group, init_process_group

        torch.set_num_threads(1)
        collective = init_process_group(rank, 2, "127.0.0.1", port, "gloo", timeout_s=60.0, local_ip="127.0.0.1")
        from gptoss_cluster.workers.model import ShardSpec

        with open_checkpoint(checkpoint) as reader:
            model = GptOssModel.from_checkpoint(reader, dtype=torch.float32, shard=ShardSpec(rank, 2),
                                                collective=collective, progress=False)
        executor = LocalExecutor(model, count_expert_tokens=False, max_loras=4, max_lora_rank=16)
        for name, slot in SLOTS.items():
            executor.add_lora(slot, sources[name])
        out = run_mixed(executor, model.config, MIXED, [0, 1, 2, 3],
                        executor.forward_logits if rank == 0 else executor.run_forward)
        held = {"experts": int(model.mlp[0].gate_up_blocks.shape[0]), "lora_bytes": executor.lora_bytes()}
        # numpy, pickled by value: a tensor would travel as a shared-memory handle that dies with this process
        out = [(rows.numpy(), decode.numpy(), token) for rows, decode, token in out] if rank == 0 else None
        results.put((rank, (out, held)))
        destroy_process_group()
    except BaseException as exc:  # noqa: BLE001
        import traceback

        results.put((rank, traceback.format_exc() + repr(exc)))


def test_two_shards_match_one(tinyb):
    """TP heads (q/k/v rows of B, o's A columns) and EP experts: the mixed step on 2 gloo ranks equals G = 1."""
    from gptoss_cluster.workers.parallel import find_free_port

    model, adapters = tinyb["model"], tinyb["adapters"]
    executor = local_executor(model, adapters)
    single = run_mixed(executor, model.config, MIXED, [0, 1, 2, 3], executor.forward_logits)

    ctx = multiprocessing.get_context("fork")  # torch is imported already: no seconds-long re-import per rank
    results = ctx.Queue()
    port = find_free_port("127.0.0.1")
    sources = {name: adapters[name].source for name in SLOTS}
    procs = [ctx.Process(target=_shard_rank, args=(r, port, str(tinyb["path"]), sources, results), daemon=True)
             for r in range(2)]
    for p in procs:
        p.start()
    try:
        got = dict(results.get(timeout=240) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=15)
            if p.is_alive():
                p.kill()
    assert not isinstance(got[0], str), got[0]
    assert not isinstance(got[1], str), got[1]
    (sharded, held0), (_, held1) = got[0], got[1]
    assert held0["experts"] == held1["experts"] == model.config.num_experts // 2
    assert held0["lora_bytes"] == held1["lora_bytes"] < executor.lora_bytes()
    sharded = [(torch.from_numpy(rows), torch.from_numpy(decode), token) for rows, decode, token in sharded]
    for r, name in enumerate(MIXED):
        torch.testing.assert_close(sharded[r][0], single[r][0], rtol=0, atol=2e-5)
        torch.testing.assert_close(sharded[r][1], single[r][1], rtol=0, atol=2e-5)
        assert sharded[r][2] == single[r][2]  # the same greedy token fed to the decode step
        want = tinyb["base"][r] if name is None else adapters[name].logits[r]
        torch.testing.assert_close(sharded[r][0], want, rtol=0, atol=1e-4)


def test_ray_executor_loads_adapters_on_every_shard(tinyb):
    """RayExecutor (2 ShardWorkers on a local Ray): add_lora reaches every shard, the mixed step equals G = 1, a bad
    adapter is a LoraError that leaves the shards serving."""
    ray = pytest.importorskip("ray")
    from gptoss_cluster.workers.engine.ray_executor import make_executor

    assert not ray.is_initialized(), "another test left Ray running"
    model, adapters = tinyb["model"], tinyb["adapters"]
    executor = local_executor(model, adapters)
    single = run_mixed(executor, model.config, MIXED, [0, 1, 2, 3], executor.forward_logits)
    sharded = make_executor(tinyb["path"], 2, dtype="float32", collective_timeout_s=30.0, step_timeout_s=120.0,
                            torch_threads=1, max_loras=4, max_lora_rank=16)
    try:
        for name, slot in SLOTS.items():
            sharded.add_lora(slot, adapters[name].source)
        assert 0 < sharded.lora_bytes() < executor.lora_bytes()
        big = tinyb["root"] / "rank-32"
        make_adapter(tinyb["path"], big, seed=0, logits=False, r=32, lora_alpha=8, target_modules=["q_proj"])
        with pytest.raises(LoraError, match="max_lora_rank=16"):
            sharded.add_lora(1, LoraSource("big", str(big)))
        sharded.check_health()
        got = run_mixed(sharded, model.config, MIXED, [0, 1, 2, 3], sharded.forward_logits)
        for r in range(len(MIXED)):
            torch.testing.assert_close(got[r][0], single[r][0], rtol=0, atol=2e-5)
            torch.testing.assert_close(got[r][1], single[r][1], rtol=0, atol=2e-5)
        sharded.remove_lora(SLOTS["full"])
        assert sharded.lora_bytes() < executor.lora_bytes() // 2
    finally:
        sharded.shutdown()
    assert not ray.is_initialized()


# ---------------------------------------------------------------------------------------------------- refusals
REFUSED = [
    ("dora", dict(target_modules=["q_proj"], use_dora=True), "DoRA"),
    ("bias", dict(target_modules=["q_proj"], bias="all"), "bias='all'"),
    ("saved", dict(target_modules=["q_proj"], modules_to_save=["lm_head"]), "modules_to_save"),
    ("lm_head", dict(target_modules=["lm_head"]), "lm_head"),
    ("embed", dict(target_modules=["embed_tokens"]), "embed_tokens"),
    ("rank", dict(r=32, target_modules=["q_proj"]), "max_lora_rank=16"),
]


@pytest.mark.parametrize("name, config, message", REFUSED, ids=[r[0] for r in REFUSED])
def test_unsupported_adapters_are_refused_by_name(tinyb, name, config, message):
    out = tinyb["root"] / f"refused-{name}"
    make_adapter(tinyb["path"], out, seed=0, logits=False, **{"r": 4, "lora_alpha": 8, **config})
    model = tinyb["model"]
    with pytest.raises(LoraError, match=message.replace("(", r"\(")):
        read_adapter(LoraSource(name, str(out)), model.config, max_lora_rank=16)
    with pytest.raises(LoraError, match=message.replace("(", r"\(")):
        LocalExecutor(model, count_expert_tokens=False).add_lora(0, LoraSource(name, str(out)))


def test_hand_made_refusals(tinyb, checkpoints, tmp_path):
    model = tinyb["model"]
    good = Path(tinyb["adapters"]["full"].source.path)

    def edited(name: str, **changes) -> LoraSource:
        folder = tmp_path / name
        shutil.copytree(good, folder)
        config = json.loads((folder / "adapter_config.json").read_text())
        config.update(changes)
        (folder / "adapter_config.json").write_text(json.dumps(config))
        return LoraSource(name, str(folder))

    cases = [
        (edited("router", target_parameters=["mlp.router.weight"]), "mlp.router.weight"),
        (edited("ia3", peft_type="IA3"), "IA3"),
        (edited("unlisted", target_parameters=["mlp.experts.down_proj"]), "do not name gate_up_proj"),
        (edited("rank-mismatch", r=5), "rank 4, the adapter config says r=5"),
        (LoraSource("missing", str(tmp_path / "nowhere")), "does not exist"),
    ]
    for source, message in cases:
        with pytest.raises(LoraError, match=message):
            read_adapter(source, model.config, 16)
    # an adapter made for another model: the shapes do not fit tinyb
    other = make_adapter(checkpoints["tiny-hf"], tmp_path / "tiny-adapter", seed=0, logits=False, r=2, lora_alpha=2,
                         target_modules=["q_proj"], layers_to_transform=[0])
    with pytest.raises(LoraError, match=r"q_proj have shapes \[2, 192\]"):
        read_adapter(other.source, model.config, 16)
