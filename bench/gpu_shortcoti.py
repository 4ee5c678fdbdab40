"""GPU throughput of ShortCoTI's image-token rollout on a Janus-Pro-1B-shaped policy (issue 17 bench). CUDA only.

Random weights, bf16, SDPA, ``--prompts`` prompts (2 × that many CFG rows) × 576 image tokens, CFG 5, temperature 1,
``top_k=0``. Cases, each the median of ``--repeats`` CUDA-synchronised runs after ``--warmup`` runs:

* ``hf``            transformers' image-mode ``generate`` (its own static cache; no log-probs) — the baseline;
* ``ours_dynamic``  ``rollout.sample_image_tokens`` on a ``DynamicCache`` (records log-probs);
* ``ours_static``   the same loop on a ``StaticCache`` reused across runs;
* ``ours_graph``    static cache + the decode step under ``torch.compile(mode="reduce-overhead")`` (CUDA graphs);
* ``vq_decode``     VQ decoding of the prompts' images (384²), and ``score`` one teacher-forced [cond; uncond]
  forward of all rows (no grad), for the time split.

Throughput = CFG rows × 576 / s, the unit of the spec's reference (a 1.65B LLaMA-shaped LM, HF generate, 32 rows:
≈ 2,049 tokens/s on one H200); target ≥ 2× that. Also reports the fraction of tokens equal to HF's for the same
seed (bf16 rounding can flip a draw, so it is reported, not asserted).

    python bench/gpu_shortcoti.py [--prompts 16] [--repeats 3] [--json out.json]
    python bench/gpu_shortcoti.py --tiny --device cpu   # logic check of the script on a tiny model

Exits with a message (status 1) when no CUDA device is present (unless ``--device cpu``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import emit

REFERENCE_TOKENS_PER_S = 2049.0  # spec shortcoti.md §7 [measured], HF generate, 32 rows, one H200


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=16, help="prompts per rollout (CFG doubles the rows)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--cases", default="hf,ours_dynamic,ours_static,ours_graph,vq_decode,score")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="a tiny model instead of the 1B shape (script check)")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def janus_pro_1b_config(tokenizer, tiny: bool = False):
    """A ``JanusConfig`` shaped like Janus-Pro-1B's language model, generation modules and VQ (vision tower kept
    small: it takes no part in image generation). ``tiny``: a small stand-in with 16 image tokens."""
    from transformers import JanusConfig

    if tiny:
        text = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 4, "vocab_size": 256}
        image, patch, vq = 32, 8, {"num_embeddings": 64, "base_channels": 32, "latent_channels": 32,
                                   "channel_multiplier": [1, 2], "num_res_blocks": 1}
    else:
        text = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 24, "num_attention_heads": 16,
                "num_key_value_heads": 16, "vocab_size": 102400}
        image, patch, vq = 384, 16, {"num_embeddings": 16384, "base_channels": 128, "latent_channels": 256,
                                     "channel_multiplier": [1, 1, 2, 2, 4], "num_res_blocks": 2}
    hidden = text["hidden_size"]
    text.update(max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = {"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 128,
              "image_size": image, "patch_size": patch, "num_image_tokens": (image // patch) ** 2,
              "projection_dim": hidden, "depth": 1, "mlp_ratio": 2}
    vq.update(embed_dim=8, projection_dim=hidden, image_token_embed_dim=hidden, num_hidden_layers=2)
    return JanusConfig(text_config=text, vision_config=vision, vq_config=vq,
                       image_token_id=tokenizer.convert_tokens_to_ids("<image_placeholder>"))


def main(argv=None) -> dict:
    a = parse(argv)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("gpu_shortcoti.py needs a CUDA device (none found); run it on a GPU node, or pass --tiny --device "
                 "cpu to check the script")
    from ctrlgen.lightning_modules.shortcoti.policy import (
        JanusPolicy,
        build_world_tokenizer,
    )
    from ctrlgen.lightning_modules.shortcoti.rollout import (
        ImageSamplingConfig,
        PromptTemplate,
        encode_left_padded,
        hf_image_generate,
        lm_step,
        sample_image_tokens,
    )
    from ctrlgen.lightning_modules.shortcoti.scoring import score_image
    from transformers import JanusForConditionalGeneration, StaticCache

    device = torch.device(a.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    tokenizer = build_world_tokenizer()
    config = janus_pro_1b_config(tokenizer, a.tiny)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = JanusForConditionalGeneration(config)
    policy = JanusPolicy(model.to(dtype).eval(), tokenizer)
    params = sum(p.numel() for p in policy.model.model.language_model.parameters())
    prompts = ["two blue spheres left of a green star on a plain white background", "a red cube",
               "three yellow rings above a black box", "one small purple heart next to a large orange cone"]
    texts = [PromptTemplate().image_text(prompts[i % len(prompts)], "") for i in range(a.prompts)]
    ids, mask = encode_left_padded(tokenizer, texts, policy.bos_token_id, policy.pad_token_id,
                                   append_id=policy.boi_token_id)
    ids, mask = ids.to(device), mask.to(device)
    N, P, rows = policy.num_image_tokens, ids.shape[1], 2 * a.prompts
    sampling = ImageSamplingConfig(cfg=5.0, temperature=1.0, top_k=0)
    static_cache = StaticCache(config=config.text_config, max_cache_len=P + N)
    compiled = torch.compile(lm_step, mode="reduce-overhead") if cuda else None

    def ours_static(step=None):
        static_cache.reset()
        return sample_image_tokens(policy, ids, mask, sampling, cache=static_cache, decode_step=step)["tokens"]

    tokens_hf = {}

    def hf():
        tokens_hf["t"] = hf_image_generate(policy, ids, mask, sampling)
        return tokens_hf["t"]

    cases = {
        "hf": hf,
        "ours_dynamic": lambda: sample_image_tokens(policy, ids, mask, sampling)["tokens"],
        "ours_static": ours_static,
        "ours_graph": (lambda: ours_static(compiled)) if compiled is not None else None,
        "vq_decode": lambda: policy.decode_images(tokens_hf["t"]),
        "score": lambda: score_image(policy, ids, mask, tokens_hf["t"], sampling),
    }
    wanted = [c for c in a.cases.split(",") if c]
    unknown = sorted(set(wanted) - set(cases))
    if unknown:
        sys.exit(f"unknown --cases {unknown}; choose from {sorted(cases)}")
    if "hf" not in wanted and any(c in wanted for c in ("vq_decode", "score")):
        wanted.insert(0, "hf")  # they read HF's tokens
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    res = {"device": torch.cuda.get_device_name() if cuda else "cpu", "dtype": str(dtype), "lm_params": params,
           "prompts": a.prompts, "cfg_rows": rows, "image_tokens": N, "prompt_len": P, "repeats": a.repeats,
           "median_s": {}, "tokens_per_s": {}, "errors": {}, "same_tokens_as_hf": {}}
    with torch.no_grad():
        for name in wanted:
            fn = cases[name]
            if fn is None:
                res["errors"][name] = "skipped (needs CUDA)"
                continue
            try:
                for w in range(a.warmup):
                    t0 = time.perf_counter()
                    fn()
                    sync()
                    if w == 0:
                        res.setdefault("first_call_s", {})[name] = time.perf_counter() - t0
                times = []
                for r in range(a.repeats):
                    torch.manual_seed(1000 + r)
                    sync()
                    t0 = time.perf_counter()
                    out = fn()
                    sync()
                    times.append(time.perf_counter() - t0)
                    if r == 0 and name.startswith("ours"):
                        torch.manual_seed(1000)
                        ref = hf_image_generate(policy, ids, mask, sampling)
                        res["same_tokens_as_hf"][name] = float((out == ref).float().mean())
            except Exception as err:  # noqa: BLE001 - one failing case must not hide the others' numbers
                res["errors"][name] = f"{type(err).__name__}: {err}"[:500]
                continue
            res["median_s"][name] = statistics.median(times)
            if name in ("hf", "ours_dynamic", "ours_static", "ours_graph"):
                res["tokens_per_s"][name] = rows * N / res["median_s"][name]
    tps = res["tokens_per_s"]
    if "hf" in tps:
        res["speedup_vs_hf"] = {k: v / tps["hf"] for k, v in tps.items()}
    res["speedup_vs_reference_2049"] = {k: v / REFERENCE_TOKENS_PER_S for k, v in tps.items()}
    if cuda:
        res["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print(f"{res['device']}, {dtype}, LM {params / 1e9:.2f}B params, {a.prompts} prompts = {rows} CFG rows × {N} "
          f"image tokens, prompt {P} tokens, median of {a.repeats}")
    print("| case | s (median) | CFG-row tokens/s | vs HF | vs 2,049 ref | same tokens as HF |")
    print("|---|---|---|---|---|---|")
    vs_hf = res.get("speedup_vs_hf", {})
    for k, s in res["median_s"].items():
        t = tps.get(k)
        cols = [f"{t:,.0f}", f"{vs_hf[k]:.2f}×" if k in vs_hf else "-", f"{t / REFERENCE_TOKENS_PER_S:.2f}×"] if t \
            else ["-", "-", "-"]
        print(f"| {k} | {s:.3f} | {' | '.join(cols)} | {res['same_tokens_as_hf'].get(k, '-')} |")
    for k, e in res["errors"].items():
        print(f"{k}: {e}")
    return emit(res, a.json)


if __name__ == "__main__":
    main()
