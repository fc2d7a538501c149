"""How close a passkey answer is: the log-probability of the right answer's first tokens, teacher-forced, under
dense attention and HiP selection variants (SmolLM2-135M in transformers, CPU; HiP simulated by
``quality_lib.HipSim``). Pass/fail flips on tiny margins at 8K; this measures the margin itself.

    python benchmarks/passkey_margin.py 0:0.25,1:0.25,1:0.75 dense=dense hip=v3 oracle=oracle \\
        oracle_norm=oracle_norm 'k2048=v3:{"k": 2048}'

Prompts are ``seed:depth`` of the 8,000-token grid of ``bench_quality.py vllm`` (depths 0, .25, .5, .75, 1; the
same keys and haystack offsets). Variants are ``name=mask[:HipConfig JSON]`` with mask one of dense, v3 (the
backend's), oracle, oracle_norm, v3_norm (``mask_variants.py``). Prints one JSON line per prompt and variant: for each of
the first 3 answer tokens, its log-probability and the top 3 tokens.
"""
import json
import sys
from functools import partial

import torch

import quality_lib as ql  # first: puts the repository on sys.path

import assets  # noqa: E402
import mask_variants as mv  # noqa: E402
from vllm_hip.config import HipConfig  # noqa: E402

DEPTHS = [0, 0.25, 0.5, 0.75, 1.0]


def main() -> None:
    from transformers import DynamicCache

    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, tok = ql.load_smollm2()
    hay = assets.haystack_text()
    variants = {}
    for arg in sys.argv[2:]:
        name, spec = arg.split("=", 1)
        mask, _, js = spec.partition(":")
        variants[name] = (mask, json.loads(js or "{}"))
    for sd in sys.argv[1].split(","):
        seed, depth = int(sd.split(":")[0]), float(sd.split(":")[1])
        cases = ql.passkey_cases(tok, 8000, DEPTHS, seed=seed, haystack=hay, offset=3000 * seed)
        _, key, prompt = next(c for c in cases if c[0] == depth)
        answer = tok.encode(" " + str(key))
        for name, (mask, hip) in variants.items():
            cfg = HipConfig.from_dict(hip)
            fn = {"v3": None, "oracle": mv.mask_oracle,
                  "oracle_norm": partial(mv.mask_oracle_norm, window=cfg.sliding_window),
                  "v3_norm": partial(mv.mask_v3_norm, window=cfg.sliding_window)}
            sim = None if mask == "dense" else ql.HipSim(cfg, mask_fn=fn[mask])
            cache, ids, steps = DynamicCache(), torch.tensor([tok.encode(prompt)]), []
            with sim if sim is not None else ql._Null():
                if sim is not None:
                    sim.reset()
                for j in range(3):
                    with torch.no_grad():
                        logits = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
                    lp = torch.log_softmax(logits[0, -1].float(), -1)
                    top = lp.topk(3)
                    steps.append({"want": tok.decode([answer[j]]), "lp_want": round(float(lp[answer[j]]), 3),
                                  "top": [(tok.decode([int(i)]), round(float(v), 3))
                                          for v, i in zip(top.values, top.indices)]})
                    ids = torch.tensor([[answer[j]]])
            print(json.dumps({"seed": seed, "depth": depth, "key": key, "variant": name, "mask": mask, "hip": hip,
                              "steps": steps}), flush=True)


if __name__ == "__main__":
    main()
