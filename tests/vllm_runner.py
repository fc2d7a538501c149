"""Runs one vLLM offline job described by a JSON spec and prints its result as JSON (the stdout line starting with HIP_RESULT).

Tests run every engine configuration in a fresh process: vLLM keeps process-wide state (distributed
groups, compiled graphs) that makes a second ``LLM`` in one process unreliable.

Spec keys: ``model``, ``backend`` ("default" or a name), ``hip`` (dict or null), ``engine`` (extra ``LLM``
kwargs), ``prompts`` (texts), ``max_tokens``, and ``mode``:
* ``generate``: one ``llm.generate`` over all prompts;
* ``staggered``: prompt i joins the running engine after ``join_after[i]`` engine steps, so prefills of
  new requests share steps with decodes of running ones (mixed batches, requests joining and leaving).
``force_triton``: run HIP's Triton kernels (the CUDA path) on CPU under the Triton interpreter.
``fake_flash_attn`` (with ``force_triton``): a torch stand-in for vLLM's FlashAttention (tests/flash_attn_ref.py),
accepting fp32, so the backend's FlashAttention paths run on CPU; the result counts its decode-shaped calls and
the rows they served (``fa_decode_calls``, ``fa_decode_rows``).
``hand_over_min_rows``: the smallest decode batch (graph size) whose HiP layers hand short rows to FlashAttention
(``backend.HAND_OVER_MIN_ROWS``, 9), lowered so a test's few prompts take that path.
``hip.record_stats``: the result carries ``attended``, the fraction of causal keys attended in prefill and decode.
``kernel_keys`` (with ``force_triton``): record every kernel launch's compile key (tests/kernel_keys.py) and
report, as ``new_kernel_variants``, launches after start-up that would compile a new kernel on a GPU.
"""
import json
import os
import sys
import time


def run(spec: dict) -> dict:
    if spec.get("force_triton"):
        # The CUDA code path (Triton kernels) on CPU tensors, through Triton's interpreter: lets CPU CI run
        # the GPU kernels inside the engine. Must be set before triton is imported.
        os.environ["TRITON_INTERPRET"] = "1"
        import vllm_hip.ops as ops

        ops._use_triton = lambda t: True
    fa_counts = {"fa_decode_calls": 0, "fa_decode_rows": 0}
    if spec.get("fake_flash_attn"):
        import torch
        from flash_attn_ref import reference_fa

        import vllm_hip.backend as backend
        from vllm_hip import compat

        def fake_fa(**kw):
            if kw["max_seqlen_q"] == 1:
                fa_counts["fa_decode_calls"] += 1
                fa_counts["fa_decode_rows"] += int((kw["seqused_k"] > 0).sum())
            reference_fa(**kw)

        compat.flash_attn_varlen = lambda: (fake_fa, 3)
        backend.FLASH_ATTN_DTYPES = (torch.float32,)
    if spec.get("hand_over_min_rows"):
        import vllm_hip.backend as backend

        backend.HAND_OVER_MIN_ROWS = int(spec["hand_over_min_rows"])
    keys: list = []
    if spec.get("kernel_keys"):
        import kernel_keys

        kernel_keys.install(keys)
    from vllm import LLM, SamplingParams

    kw = dict(model=spec["model"], enforce_eager=True, seed=0, dtype="float32", max_model_len=2048)
    kw.update(spec.get("engine", {}))
    if spec.get("backend", "default") != "default":
        kw["attention_backend"] = spec["backend"]
    if spec.get("hip") is not None:
        kw["additional_config"] = {"hip": spec["hip"]}
    if spec.get("ray"):  # a local Ray instance owned by this job
        import ray

        ray.init(num_cpus=spec["ray"].get("num_cpus", 2), include_dashboard=False, log_to_driver=False)
    t0 = time.time()
    llm = LLM(**kw)
    startup = time.time() - t0
    fa_counts.update(fa_decode_calls=0, fa_decode_rows=0)  # serving only (the start-up check calls it too)
    startup_launches = len(keys)
    sp = SamplingParams(temperature=0.0, max_tokens=spec.get("max_tokens", 16), ignore_eos=True)
    t0 = time.time()
    if spec.get("mode", "generate") == "generate":
        outs = llm.generate(spec["prompts"], sp, use_tqdm=False)
        tokens = [list(o.outputs[0].token_ids) for o in outs]
    else:
        engine = llm.llm_engine
        join_after = spec["join_after"]
        pending = sorted(range(len(spec["prompts"])), key=lambda i: join_after[i])
        done: dict[str, list[int]] = {}
        step = 0
        while pending or engine.has_unfinished_requests():
            while pending and join_after[pending[0]] <= step:
                i = pending.pop(0)
                engine.add_request(str(i), spec["prompts"][i], sp)
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = list(out.outputs[0].token_ids)
            step += 1
        tokens = [done[str(i)] for i in range(len(spec["prompts"]))]
    result = {"tokens": tokens, "startup_s": round(startup, 1), "run_s": round(time.time() - t0, 1)}
    if spec.get("fake_flash_attn"):
        result.update(fa_counts)
    if (spec.get("hip") or {}).get("record_stats"):  # counted in this process (no engine multiprocessing)
        from vllm_hip import stats

        frac = stats.attended_fraction()
        result["attended"] = {k: frac[k] for k in ("prefill", "decode")}
    if spec.get("kernel_keys"):
        import kernel_keys

        result.update(startup_kernel_launches=startup_launches, serving_kernel_launches=len(keys) - startup_launches,
                      new_kernel_variants=kernel_keys.new_variants(keys, startup_launches))
    if spec.get("ray"):
        import ray

        del llm
        ray.shutdown()
    return result


if __name__ == "__main__":
    result = run(json.loads(sys.argv[1]))
    print("HIP_RESULT " + json.dumps(result), flush=True)
