"""HipConfig parsing and validation: defaults, and a clear error naming the fix for every bad value."""
import pytest

from vllm_hip.config import HipConfig, HipConfigError, hip_config_from_vllm


def test_defaults_follow_the_paper_except_key_block_size_and_budget():
    c = HipConfig.from_dict(None)
    assert (c.k, c.block_size_q, c.block_size_k, c.query_stride) == (1024, 64, 8, 2)
    assert (c.sink_tokens, c.sliding_window, c.dense_layers, c.mask_refresh_interval) == (128, 2048, (0, 1, 2), 8)
    assert c.n_select == 128
    assert c.mask_exact_blocks == 8
    assert c.mask_kwargs == dict(n_select=128, block_size_q=64, block_size_k=8, sink_tokens=128, query_stride=2,
                                 exact_blocks=8, norm_window=1024)
    assert c.normalised_score and c.mask_refresh_first_steps == 8
    assert HipConfig.from_dict({"normalised_score": False}).mask_kwargs["norm_window"] == 0


def test_norm_window_bounds_the_normalised_scores_reference_keys_within_the_window():
    kw = lambda raw: HipConfig.from_dict(raw).mask_kwargs["norm_window"]  # noqa: E731
    assert kw({"norm_window": 512}) == 512
    assert kw({"norm_window": 0}) == 2048  # 0: the whole window
    assert kw({"norm_window": 4096, "sliding_window": 1024}) == 1024  # never past the window
    assert kw({"norm_window": 512, "normalised_score": False}) == 0  # raw score: no reference at all


def test_json_text_and_dict_agree():
    assert HipConfig.from_dict('{"k": 1024, "dense_layers": [2, 0]}') == HipConfig.from_dict(
        {"k": 1024, "dense_layers": [0, 2]}
    )


def test_prefill_threshold_follows_the_decode_threshold_unless_set():
    assert HipConfig.from_dict({"dense_below_seq_len": 16384}).prefill_dense_below == 16384
    assert HipConfig.from_dict({"dense_below_seq_len": 16384,
                                "prefill_dense_below_seq_len": 32768}).prefill_dense_below == 32768
    assert HipConfig.from_dict({"prefill_dense_below_seq_len": 32768}).dense_below_seq_len == 0


def test_frozen():
    c = HipConfig()
    with pytest.raises(Exception):
        c.k = 3


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"kk": 1}, r"unknown key\(s\) \['kk'\].*valid keys"),
        ({"k": 100, "block_size_k": 8}, r"hip.k \(100\) must be a multiple of hip.block_size_k \(8\); try k=96"),
        ({"k": -4}, r"hip.k must be > 0"),
        ({"sliding_window": -1}, r"hip.sliding_window must be >= 0"),
        ({"norm_window": -1}, r"hip.norm_window must be >= 0"),
        ({"block_size_k": 3, "k": 9}, r"power of two"),
        ({"sink_tokens": 3, "block_size_k": 2}, r"hip.sink_tokens \(3\) must be a multiple of hip.block_size_k"),
        ({"query_stride": 128}, r"query_stride \(128\) must be <= hip.block_size_q"),
        ({"k": "512"}, r"hip.k must be an integer"),
        ({"k": True}, r"hip.k must be an integer"),
        ({"dense_layers": 3}, r"dense_layers must be a list"),
        ({"dense_layers": [-1]}, r"non-negative"),
        ({"mask_refresh_interval": 0}, r"mask_refresh_interval must be > 0"),
        ({"prefill_dense_below_seq_len": -1}, r"hip.prefill_dense_below_seq_len must be >= 0"),
        ({"mask_refresh_first_steps": -2}, r"hip.mask_refresh_first_steps must be >= 0"),
        ({"normalised_score": 1}, r"hip.normalised_score must be true or false"),
        ({"sliding_window": 0}, r"set hip.sliding_window > 0 or hip.normalised_score to false"),
        ({"dense_below_seq_len": 4096, "prefill_dense_below_seq_len": 1024},
         r"prefill_dense_below_seq_len \(1024\) must be 0 or at least hip.dense_below_seq_len \(4096\)"),
        ({"mask_exact_blocks": 0}, r"mask_exact_blocks must be > 0"),
        ({"mask_exact_blocks": 6}, r"mask_exact_blocks must be a power of two up to 16, got 6"),
        ({"mask_exact_blocks": 32}, r"mask_exact_blocks must be a power of two up to 16, got 32"),
        ({"offload": {"gpu_blocks": -1}}, r"must be >= 0"),
        ({"offload": {"gpu": 1}}, r"unknown key\(s\) \['gpu'\] in hip.offload"),
        ({"offload": {"gpu_blocks": 4096}}, r"host_gib is 0"),
        ({"offload": {"host_gib": "64"}}, r"host_gib must be a number"),
        ({"offload": {"host_gib": 8, "max_moves": 1.5}}, r"max_moves must be an integer"),
        ({"offload": {"host_gib": 8, "selection_cache_gib": True}}, r"selection_cache_gib must be a number"),
        ({"offload": {"host_gib": 8, "selection_cache_gib": -1}}, r"selection_cache_gib must be >= 0"),
        ("{not json", r"not valid JSON"),
        ([1, 2], r"must be a JSON object"),
    ],
)
def test_bad_values_raise_clear_errors(raw, message):
    with pytest.raises(HipConfigError, match=message):
        HipConfig.from_dict(raw)


def test_read_from_vllm_additional_config():
    class FakeVllmConfig:
        additional_config = {"hip": {"k": 256, "block_size_k": 4}}

    c = hip_config_from_vllm(FakeVllmConfig())
    assert (c.k, c.block_size_k, c.n_select) == (256, 4, 64)

    class NoHip:
        additional_config = None

    assert hip_config_from_vllm(NoHip()) == HipConfig()


def test_coarse_interval_default_follows_refresh_interval_and_exact_stage():
    """Unset ``mask_coarse_interval`` is 8 x ``mask_refresh_interval`` when the exact stage exists, else 0 (no
    error for a user who only asks for plain v3); an explicit value is kept and validated."""
    assert HipConfig.from_dict({}).mask_coarse_interval == 64
    assert HipConfig.from_dict({"mask_refresh_interval": 16}).mask_coarse_interval == 128
    assert HipConfig.from_dict({"mask_exact_blocks": 1}).mask_coarse_interval == 0
    assert HipConfig.from_dict({"mask_coarse_interval": 0}).mask_coarse_interval == 0
    with pytest.raises(HipConfigError, match="mask_coarse_interval"):
        HipConfig.from_dict({"mask_coarse_interval": 12})
