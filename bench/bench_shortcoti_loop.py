"""CPU cost of ShortCoTI's own image-token loop vs transformers' image-mode ``generate`` (issue 17 bench).

One tiny random Janus (``--hidden``, ``--layers``, ``--image-size``/8 squared image tokens, codebook ``--codebook``)
and ``--rows`` left-padded image prompts of different lengths. Alternating within one run, ``--repeats`` timed passes
each after one warm-up, with CFG 5, temperature 1, ``top_k=0`` for both:

* ``hf``: ``JanusForConditionalGeneration.generate(generation_mode="image")`` (static cache, no log-probs);
* ``ours``: ``rollout.sample_image_tokens`` (dynamic cache, records the guided and the cond log-probs);
* ``ours_static``: the same loop on a transformers ``StaticCache``;
* ``score``: the teacher-forced image log-probs of the rows (one [cond; uncond] forward, no grad), for scale.

Before timing it checks that the loop and HF draw the same tokens for the same seed. Reports median / min ms,
ms per token step and the ratio hf / ours.

    python bench/bench_shortcoti_loop.py --rows 8 --image-size 64 --repeats 5
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


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=8, help="prompts (each is a cond and an uncond row)")
    p.add_argument("--image-size", type=int, default=64, help="image side; tokens = (size / 8)^2")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--codebook", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on shared cores)")
    p.add_argument("--json", default=None, help="also write the result to this file")
    return p.parse_args(argv)


PROMPTS = ["a red cube", "two blue spheres left of a green star", "three yellow rings above a black box", "a cat",
           "one small purple heart next to a large orange cone", "four pink stars",
           "a gray circle below a cyan triangle", "five brown disks in the middle of the picture"]


def main(argv=None) -> dict:
    from ctrlgen.lightning_modules.shortcoti.policy import JanusPolicy, TinyJanusSpec
    from ctrlgen.lightning_modules.shortcoti.rollout import (
        ImageSamplingConfig,
        PromptTemplate,
        encode_left_padded,
        hf_image_generate,
        sample_image_tokens,
    )
    from ctrlgen.lightning_modules.shortcoti.scoring import score_image
    from transformers import StaticCache

    a = parse(argv)
    torch.set_num_threads(a.threads)
    spec = TinyJanusSpec(hidden_size=a.hidden, intermediate_size=2 * a.hidden, num_layers=a.layers,
                         image_size=a.image_size, codebook_size=a.codebook, init_std=0.1,
                         max_position_embeddings=max(512, 4 * (a.image_size // 8) ** 2))
    policy = JanusPolicy.tiny(spec, seed=0).eval()
    template = PromptTemplate()
    texts = [template.image_text(PROMPTS[i % len(PROMPTS)], "") for i in range(a.rows)]
    ids, mask = encode_left_padded(policy.tokenizer, texts, policy.bos_token_id, policy.pad_token_id,
                                   append_id=policy.boi_token_id)
    sampling = ImageSamplingConfig(cfg=5.0, temperature=1.0, top_k=0)
    N, P = policy.num_image_tokens, ids.shape[1]

    torch.manual_seed(0)
    hf_tokens = hf_image_generate(policy, ids, mask, sampling)
    torch.manual_seed(0)
    ours_tokens = sample_image_tokens(policy, ids, mask, sampling)["tokens"]
    same = bool(torch.equal(hf_tokens, ours_tokens))

    def static():
        cache = StaticCache(config=policy.model.config.text_config, max_cache_len=P + N)
        return sample_image_tokens(policy, ids, mask, sampling, cache=cache)

    cases = {
        "hf": lambda: hf_image_generate(policy, ids, mask, sampling),
        "ours": lambda: sample_image_tokens(policy, ids, mask, sampling),
        "ours_static": static,
        "score": lambda: score_image(policy, ids, mask, ours_tokens, sampling),
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    with torch.no_grad():
        for fn in cases.values():
            fn()  # warm-up
        for _ in range(a.repeats):
            for name, fn in cases.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(1e3 * (time.perf_counter() - t0))
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    res = {
        "rows": a.rows, "cfg_rows": 2 * a.rows, "image_tokens": N, "prompt_len": P, "hidden": a.hidden,
        "layers": a.layers, "codebook": a.codebook, "threads": a.threads, "repeats": a.repeats,
        "params": sum(p.numel() for p in policy.parameters()), "same_tokens_as_hf": same,
        "median_ms": med, "min_ms": best, "ms_per_step": {k: med[k] / N for k in ("hf", "ours", "ours_static")},
        "hf_over_ours": med["hf"] / med["ours"], "hf_over_ours_min": best["hf"] / best["ours"],
        "hf_over_ours_static": med["hf"] / med["ours_static"],
    }
    print(f"tiny Janus {res['params']:,} params (hidden {a.hidden}, {a.layers} layers, codebook {a.codebook}); "
          f"{a.rows} prompts ({2 * a.rows} CFG rows), prompt {P} tokens, {N} image tokens; {a.threads} thread(s), "
          f"median of {a.repeats}; same tokens as HF for the same seed: {same}")
    print("| sampler | ms (median / min) | ms per token step |\n|---|---|---|")
    for k in cases:
        per = f"{med[k] / N:.2f}" if k != "score" else "(one forward)"
        print(f"| {k} | {med[k]:.1f} / {best[k]:.1f} | {per} |")
    print(f"hf / ours: {res['hf_over_ours']:.2f}× (min {res['hf_over_ours_min']:.2f}×); hf / ours_static: "
          f"{res['hf_over_ours_static']:.2f}×")
    return emit(res, a.json)


if __name__ == "__main__":
    main()
