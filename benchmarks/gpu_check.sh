#!/usr/bin/env bash
# `make gpu-check`: every GPU test and benchmark of vllm-hip, on a CUDA machine; logs under $OUT.
#
#   bash benchmarks/gpu_check.sh [install] [kernels] [vllm] [bench] [pdl] [splits] [throughput] [offload] [longest] [serve]   (default: all)
#
# install     installs this checkout into $SITE (default /tmp/site) with its entry point, so vLLM's
#             engine processes load the plugin, and any other wheel in .gpu-assets (gguf: `pip wheel --no-deps
#             -w .gpu-assets gguf`); converts SmolLM2 from $SMOLLM2_GGUF if given.
# kernels     GPU kernel tests (tests/test_kernels_triton.py, real sizes).
# vllm        HIP inside vLLM on the GPU (tests/test_gpu_vllm.py): equality with FLASH_ATTN, CUDA graphs,
#             SmolLM2 passkey, no Triton compile while serving, offload equality. HIP_GPU_JOBS=a,b runs only
#             those engine jobs (a developer shortcut when device time is short; the other tests skip).
# bench       benchmarks/bench_kernels.py (single-layer kernels vs dense FlashAttention), with the backend's selection
#             and again with plain v3 (exact_blocks 1) at three lengths, for the exact stage's cost.
# pdl         bench_kernels.py --pdl-sweep: one HiP decode layer's launches (KV write, mask, attention) in a CUDA graph
#             with programmatic dependent launch off and on (refreshing, exact-only, idle), at 32K/128K, batch 1/6/16.
# splits      benchmarks/bench_decode_splits.py --dense --mask: decode attention by split count in padded graphs (6 requests in
#             the graph of 8), short rows on FlashAttention against the HiP kernel in graphs of 2-8, the staged
#             refresh's mask launches (~3 min on 2026-12-03).
# throughput  benchmarks/bench_throughput.py (vLLM end to end, FLASH_ATTN vs HIP).
# offload     bench_throughput.py: HIP vs HIP_OFFLOAD with the HiP layers' GPU KV (pages + selection cache) capped at 20 %
#             of what 6 x 128K requests need (425 s on 2026-12-03, 77.6 GiB pinned).
# longest     the longest single request HIP_OFFLOAD serves (LONGEST, default 1.4M tokens; LONGEST_HOST_GIB, default 72).
# serve       benchmarks/serve_bench.sh on the same dummy Llama-3.1-8B (vllm serve + vllm bench serve, 32K).
# staged      HIP alone at 6 x 128K, full batch, with the staged refresh (hip.mask_coarse_interval, STAGED_COARSE,
#             default 64, the default) and without it, in one command (~5 min): what skipping the halving rounds on 7 of 8 refreshes
#             buys (BENCHMARKS.md §2, 2026-12-03). Not in the default list.
# profile     HIP alone at 6 x 128K (PROFILE_ARGS replaces `--backends HIP --lengths 131072 --max-seqs 6`) with --profile: torch profiler (kernels, ops) and cProfile (plain Python) tables of
#             the decode steps, for the host time the step spends outside GPU kernels (BENCHMARKS.md §2). Not in
#             the default list.
#
# On the lent H200 one command may run 10 minutes, so run it in slices, back to back (the machine goes cold
# after 30 s idle): `install`, then `kernels` and `vllm` side by side (`gpu_check.sh kernels & gpu_check.sh vllm;
# wait`; not a `pgrep -f` loop, which matches its own shell and waits forever; `vllm` needs .cache/corpus and the
# tiny model carried: 171 s and 192 s side by side on the H200, the engine jobs of tests/test_gpu_vllm.py run 6 at a time),
# `throughput` (354 s on 2026-12-02 after `install` and the kit, detokenize off), `offload` (HIP vs HIP_OFFLOAD only: ~7 min), `longest` in its own
# command (LONGEST=1400000 LONGEST_HOST_GIB=72: 523 s, the most this machine holds), `profile` (158 s), `bench` (72 s),
# `serve` (~6 min); `kernels` takes ~6.5 min (172 tests in 380 s on 2026-12-03, side by side with `vllm`, which took 271 s
# with the SmolLM2 jobs). SmolLM2's GGUF comes over in two pieces (`split -b 49181216 -d -a 1 GGUF
# .gpu-assets/smollm2.gguf.part`), each carried by its own command (a kit piece and a GGUF piece together pass the
# 64 MiB carry limit) and copied to /tmp/kit; join them and set SMOLLM2_GGUF to the joined file for `install`.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/hip-gpu-out}
SITE=${SITE:-/tmp/site}
mkdir -p "$OUT"
steps=${*:-install kernels vllm bench pdl splits throughput offload longest serve}
# The checkout first (its vllm_hip wins), $SITE for vLLM and the plugin's entry point (dist-info).
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}" VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi -L | tee "$OUT/gpu.txt"
status=0
for step in $steps; do
  start=$(date +%s)
  case $step in
    install)
      # A wheel built beforehand (pip wheel --no-deps -w .gpu-assets .) installs without build tools.
      src=$(ls .gpu-assets/vllm_hip-*.whl 2>/dev/null | head -1)
      python3 -m pip install -q --no-deps --no-index --no-compile --upgrade --target "$SITE" "${src:-.}" 2>&1 \
        | grep -v "RECORD line" | tail -20
      # other carried wheels (gguf, to convert SmolLM2's GGUF: the kit's vLLM does not bring it)
      for w in .gpu-assets/*.whl; do
        case $w in *vllm_hip-*) ;; *) python3 -m pip install -q --no-deps --no-index --target "$SITE" "$w" 2>&1 | tail -3 ;; esac
      done
      if [ -n "${SMOLLM2_GGUF:-}" ] && [ ! -d .cache/smollm2 ]; then
        python3 -c "import sys; sys.path.insert(0, 'benchmarks'); import assets; from pathlib import Path; \
assets._atomic_dir(assets._cache(None) / 'smollm2', lambda t: assets._convert_gguf(Path('$SMOLLM2_GGUF'), t, assets.SMOLLM2_DTYPE))"
      fi
      python3 -c "import vllm_hip.kernels.triton_hip" ;;
    kernels) python3 -m pytest -q -ra tests/test_kernels_triton.py tests/test_kernels_tiered.py tests/test_page_swap.py \
               tests/test_kv_residency.py tests/test_decode_plan.py tests/test_compile_kernels.py \
               tests/test_kernel_specialization.py 2>&1 | tee "$OUT/gpu_kernel_tests.log" | tail -15 ;;
    vllm) python3 -m pytest -q -ra -s tests/test_gpu_vllm.py ${VLLM_TEST_ARGS:-} 2>&1 | tee "$OUT/gpu_vllm_tests.log" | tail -25 ;;
    bench) python3 benchmarks/bench_kernels.py --decode-batches 1,6,16 --sweep 2>&1 | tee "$OUT/bench_kernels.log" | tail -40
           # the same decode and 128K prefill with plain v3 (hip.mask_exact_blocks 1): what the exact stage costs
           python3 benchmarks/bench_kernels.py --exact-blocks 1 --decode-batches 1,6,16 --lengths 8192,131072,1048576 \
             --prefill-max 131072 2>&1 \
             | tee "$OUT/bench_kernels_exact1.log" | tail -12 ;;
    pdl) python3 benchmarks/bench_kernels.py --lengths 32768,131072 --decode-batches 1,6,16 --prefill-max 0 --pdl-sweep \
           2>&1 | tee "$OUT/bench_pdl.log" | grep -E "pdl sweep|^decode" ;;
    splits) python3 benchmarks/bench_decode_splits.py --dense --mask --log "$OUT/bench_decode_splits.log" 2>&1 \
              | grep -v "^  all" | tail -40 ;;
    throughput) python3 benchmarks/bench_throughput.py ${THROUGHPUT_ARGS:-} --log "$OUT/throughput.jsonl" 2>&1 \
                  | tee "$OUT/bench_throughput.log" | tail -30 ;;
    offload) python3 benchmarks/bench_throughput.py --backends HIP,HIP_OFFLOAD --lengths 131072 --offload-cap 0.2 \
               --offload-reqs 6 --max-seqs 6 --only-full --log "$OUT/offload.jsonl" 2>&1 | tee "$OUT/bench_offload.log" | tail -12
             ;;
    longest) python3 benchmarks/bench_throughput.py --backends HIP_OFFLOAD --lengths ${LONGEST:-1400000} --output-len 64 \
               --max-seqs 1 --batched-tokens 32768 --offload "{\"host_gib\": ${LONGEST_HOST_GIB:-72}}" \
               --log "$OUT/longest.jsonl" 2>&1 | tee "$OUT/bench_longest.log" | tail -8 ;;
    staged) for c in 0 ${STAGED_COARSE:-64}; do
              python3 benchmarks/bench_throughput.py --backends HIP --lengths 131072 --only-full --max-seqs 6 \
                --hip "{\"k\": 1024, \"block_size_k\": 8, \"block_size_q\": 64, \"sink_tokens\": 128, \"sliding_window\": 2048, \"norm_window\": 1024, \"dense_layers\": [0, 1, 2], \"dense_below_seq_len\": 16384, \"prefill_dense_below_seq_len\": 16384, \"mask_coarse_interval\": $c}" \
                --log "$OUT/staged_$c.jsonl" 2>&1 | tee "$OUT/bench_staged_$c.log" | tail -4
            done ;;
    profile) python3 benchmarks/bench_throughput.py ${PROFILE_ARGS:---backends HIP --lengths 131072 --max-seqs 6} --only-full \
               --output-len 96 --profile "$OUT" --log "$OUT/profile.jsonl" 2>&1 | tee "$OUT/bench_profile.log" | tail -6 ;;
    serve) [ -d /tmp/llama8b-dummy ] || python3 benchmarks/bench_throughput.py --model-only
           OUT="$OUT/serve" bash benchmarks/serve_bench.sh /tmp/llama8b-dummy "FLASH_ATTN HIP" ${SERVE_ARGS:-32768 256 32 8} \
             --load-format dummy 2>&1 | tee "$OUT/serve_bench.log" | grep -E "==|Successful|Request throughput|Output token|Mean TTFT|Median TTFT|Mean TPOT|exited" ;;
    *) echo "unknown step $step"; status=2 ;;
  esac
  rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || status=$rc
  echo "== $step: exit $rc, $(( $(date +%s) - start )) s" | tee -a "$OUT/steps.txt"
done
exit $status
