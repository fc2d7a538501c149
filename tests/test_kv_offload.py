"""vllm_hip.kv_offload on CPU: the GPU/host split of the KV pool and its errors, the shrinking of vLLM's
per-layer KV tensors, and host tiers + residency driving the HiP ops to the same results as one flat cache."""
from dataclasses import dataclass, field

import pytest
import torch

from vllm_hip import ops
from vllm_hip.config import HipConfig, HipConfigError
from vllm_hip.kv_offload import HostTiers, OffloadPlan, plan_offload, shrink_kv_cache_configs

PAGE = 64 * 1024  # one 16-token page of one Llama-3.1-8B layer (8 KV heads x 128 x K,V x bf16)


@dataclass
class Spec:
    page_size_bytes: int = PAGE


def _specs(n_layers=32):
    return {f"model.layers.{i}.self_attn.attn": Spec() for i in range(n_layers)}


def _cfg(**off):
    return HipConfig.from_dict({"offload": off})


def test_plan_splits_pool_between_gpu_and_host():
    cfg = _cfg(host_gib=29 * PAGE * 1000 / 2**30, gpu_blocks=500)  # exactly 1000 host pages per HiP layer
    plan = plan_offload(cfg, _specs(), available_bytes=10 * 2**30)
    assert (plan.device_pages, plan.host_pages, plan.num_pages) == (500, 1000, 1500)
    assert len(plan.dense_layers) == 3 and len(plan.hip_layers) == 29  # default dense_layers (0, 1, 2)
    assert plan.gpu_bytes() == PAGE * (3 * 1500 + 29 * 500)
    assert plan.host_bytes() == PAGE * 29 * 1000


def test_plan_uses_all_gpu_kv_memory_when_gpu_blocks_is_0():
    avail = 32 * PAGE * 1000  # 1000 pages of every layer without offload
    plan = plan_offload(_cfg(host_gib=1.0), _specs(), available_bytes=avail)
    assert plan.gpu_bytes() <= avail
    # One more GPU page per HiP layer would not fit.
    bigger = OffloadPlan(plan.page_bytes, plan.hip_layers, plan.dense_layers, plan.device_pages + 1, plan.host_pages)
    assert bigger.gpu_bytes() > avail
    assert plan.num_pages > 1000  # the pool grew beyond what the GPU alone holds


@dataclass
class Llama8BSpec:
    page_size_bytes: int = PAGE
    num_kv_heads: int = 8
    head_size: int = 128
    dtype: torch.dtype = torch.bfloat16


def test_plan_takes_the_selection_cache_out_of_the_gpu_budget():
    """The selection cache: (max_num_seqs + 1) mask rows x k x mask_exact_blocks tokens of K and V per HiP layer,
    32 MiB per row and layer at the defaults with Llama-3.1-8B's KV heads; it counts in the GPU bytes, and with
    gpu_blocks 0 the pages get what is left. Off (selection_cache_gib 0) it costs nothing."""
    specs = {f"model.layers.{i}.self_attn.attn": Llama8BSpec() for i in range(32)}
    avail = 32 * PAGE * 4000
    on = plan_offload(_cfg(host_gib=1.0), specs, available_bytes=avail, max_num_seqs=6)
    off = plan_offload(_cfg(host_gib=1.0, selection_cache_gib=0), specs, available_bytes=avail, max_num_seqs=6)
    assert on.selection_cache_bytes == 29 * 7 * 32 * 2**20 and off.selection_cache_bytes == 0
    assert on.gpu_bytes() <= avail and off.gpu_bytes() <= avail
    fewer = off.device_pages - on.device_pages  # the cache's pages, shared out over the 32 layers' page budgets
    assert on.selection_cache_bytes // PAGE // 32 <= fewer <= on.selection_cache_bytes // PAGE // 32 + 1
    explicit = plan_offload(_cfg(host_gib=1.0, gpu_blocks=100), specs, available_bytes=avail, max_num_seqs=6)
    assert explicit.gpu_bytes() == PAGE * (3 * explicit.num_pages + 29 * 100) + on.selection_cache_bytes
    with pytest.raises(HipConfigError, match=r"selection cache.*lower max_num_seqs"):
        plan_offload(_cfg(host_gib=1.0), specs, available_bytes=avail, max_num_seqs=10)  # 10 GiB of cache, 8 in all


def test_selection_cache_is_used_only_where_one_row_per_slot_fits_its_budget(caplog):
    """Decided from the configuration and the model alone (the engine's plan and the workers' builders agree): on
    with a row per decode slot within hip.offload.selection_cache_gib and the staged refresh on; otherwise off,
    and the plan says why and what to change."""
    from vllm_hip.kv_offload import selection_cache_rows

    llama = dict(num_kv_heads=8, head_size=128, element_size=2, num_hip_layers=29)
    assert selection_cache_rows(_cfg(host_gib=1.0), 6, **llama) == (7, None)  # 6.3 GiB <= 16
    rows, why = selection_cache_rows(_cfg(host_gib=1.0), 256, **llama)  # 257 rows: 233 GiB
    assert rows == 0 and "lower --max-num-seqs to 16" in why and "selection_cache_gib=16" in why
    unstaged = HipConfig.from_dict({"offload": {"host_gib": 1.0}, "mask_coarse_interval": 0})
    assert selection_cache_rows(unstaged, 6, **llama)[0] == 0
    assert selection_cache_rows(_cfg(host_gib=1.0, selection_cache_gib=0), 6, **llama)[0] == 0
    assert selection_cache_rows(_cfg(), 6, **llama)[0] == 0  # offload off
    specs = {f"model.layers.{i}.self_attn.attn": Llama8BSpec() for i in range(32)}
    with caplog.at_level("WARNING"):
        plan = plan_offload(_cfg(host_gib=1.0), specs, available_bytes=32 * PAGE * 4000, max_num_seqs=256)
    assert plan.selection_cache_bytes == 0
    assert "without the selection cache" in caplog.text and "lower --max-num-seqs" in caplog.text


@pytest.mark.parametrize("off,avail,message", [
    ({"host_gib": 1.0, "gpu_blocks": 10**6}, 2**30, r"does not fit in the GPU KV memory.*Lower hip.offload.gpu_blocks"),
    ({"host_gib": 1e-6}, 2**30, r"holds no KV page"),
])
def test_plan_errors_name_the_fix(off, avail, message):
    with pytest.raises(HipConfigError, match=message):
        plan_offload(_cfg(**off), _specs(), available_bytes=avail)


def test_plan_refuses_mixed_page_sizes():
    specs = _specs(4)
    specs["model.layers.3.self_attn.attn"] = Spec(PAGE * 2)
    with pytest.raises(HipConfigError, match="one KV page size"):
        plan_offload(_cfg(host_gib=1.0), specs, available_bytes=2**30)


@dataclass
class Tensor:
    size: int
    shared_by: list
    offset: int = 0
    block_stride: int = 0


@dataclass
class KVConfig:
    kv_cache_tensors: list = field(default_factory=list)


def test_shrink_only_hip_layers():
    specs = _specs(5)
    cfg = HipConfig.from_dict({"offload": {"host_gib": 1.0, "gpu_blocks": 7}, "dense_layers": [0]})
    plan = plan_offload(cfg, specs, available_bytes=2**30)
    kv = KVConfig([Tensor(PAGE * plan.num_pages, [n]) for n in sorted(specs)])
    shrink_kv_cache_configs([kv], plan)
    sizes = {t.shared_by[0]: t.size for t in kv.kv_cache_tensors}
    assert sizes["model.layers.0.self_attn.attn"] == PAGE * plan.num_pages
    assert all(sizes[f"model.layers.{i}.self_attn.attn"] == PAGE * 7 for i in range(1, 5))
    packed = KVConfig([Tensor(PAGE * 10, ["model.layers.1.self_attn.attn", "model.layers.2.self_attn.attn"])])
    with pytest.raises(HipConfigError, match="one KV tensor per layer"):
        shrink_kv_cache_configs([packed], plan)


def test_host_tiers_serve_hip_ops_like_one_flat_cache():
    """Steps of writes + rebalances through HostTiers/KVResidency, then HiP mask and attention read the two tiers
    through the translated tables: same selection and output as one flat cache holding every page."""
    from vllm_hip.kernels.reference import make_query_blocks, window_starts

    torch.manual_seed(0)
    Hkv, hs, page, N, G, Hq = 2, 16, 16, 24, 6, 4
    flat = torch.zeros(N, Hkv, page, 2 * hs)  # vLLM's logical view [pages, Hkv, page, 2*hs]
    dev = torch.zeros(G, page, Hkv, 2 * hs).transpose(1, 2)  # the device tier, same layout as vLLM's tensor
    cfg = HipConfig.from_dict({"offload": {"host_gib": (N - G) * Hkv * page * 2 * hs * 4 / 2**30, "max_moves": 3}})
    tiers = HostTiers(cfg, {"model.layers.5.attn": dev}, page, "cpu")
    res = tiers.residency
    assert (res.num_pages, res.num_device_pages) == (N, G)
    hk, hv = tiers.host_kv["model.layers.5.attn"].transpose(1, 2).split(hs, -1)
    dk, dv = dev.transpose(1, 2).split(hs, -1)
    fk, fv = flat.transpose(1, 2).split(hs, -1)
    block_table = torch.randperm(N)[: N - 2].view(2, -1).to(torch.int32)  # two requests, 11 pages each
    seq_lens = torch.tensor([170, 150], dtype=torch.int32)
    # Write the requests' tokens in 4 steps, rebalancing in between, touching a few pages each step.
    for step in range(4):
        pos = torch.arange(step * 45, min((step + 1) * 45, 176))
        slots = torch.cat([block_table[r, (pos // page).long()].long() * page + pos % page for r in range(2)])
        slots = torch.where(pos.repeat(2) < seq_lens.repeat_interleave(len(pos)).long(), slots, torch.full_like(slots, -1))
        key, value = torch.randn(len(slots), Hkv, hs), torch.randn(len(slots), Hkv, hs)
        ops.kv_write(key, value, fk, fv, slots)
        res.advance()
        res.touch(torch.randint(0, N, (5,)))
        res.rebalance(tiers.swap)
        ops.kv_write(key, value, dk, dv, res.translate_slots(slots, page), host_k_cache=hk, host_v_cache=hv)
    res.check()
    assert (res.loc >= G).any() and (res.loc < G).any()  # pages really live in both tiers
    phys = res.translate_block_table(block_table)
    q = torch.randn(int(seq_lens.sum()), Hq, hs)
    qsl = torch.tensor([0, 170, 320])
    qb_req, qb_start, qb_len, qb_pos0 = make_query_blocks(qsl, seq_lens.long(), 32)
    ws = window_starts(qb_pos0, 32, 4)
    mk = dict(n_select=4, block_size_q=32, block_size_k=4, sink_tokens=4, query_stride=1)
    want_idx = ops.mask(q, fk, block_table, qb_req, qb_start, qb_len, ws, **mk)
    got_idx = ops.mask(q, dk, phys, qb_req, qb_start, qb_len, ws, host_k_cache=hk, **mk)
    assert torch.equal(got_idx, want_idx)
    ak = dict(sink_tokens=4, block_size_k=4, scale=hs ** -0.5)
    want = ops.attention(q, fk, fv, block_table, seq_lens, qb_req, qb_start, qb_len, qb_pos0, ws, want_idx,
                         out=torch.zeros_like(q), **ak)
    got = ops.attention(q, dk, dv, phys, seq_lens, qb_req, qb_start, qb_len, qb_pos0, ws, got_idx,
                        out=torch.zeros_like(q), host_k_cache=hk, host_v_cache=hv, **ak)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
