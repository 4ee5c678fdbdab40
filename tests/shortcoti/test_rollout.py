"""Two-level rollout and teacher-forced scoring (spec §2.1–2.3, §4, §8.4, §8.9, §8.10)."""

from __future__ import annotations

import pytest
import torch
from ctrlgen.lightning_modules.shortcoti.policy import JanusPolicy, TinyJanusSpec
from ctrlgen.lightning_modules.shortcoti.rollout import (
    ImageSamplingConfig,
    PromptTemplate,
    SamplingConfig,
    encode_left_padded,
    hf_image_generate,
    rollout_cot,
    rollout_image,
    sample_image_tokens,
    two_level_rollout,
)
from ctrlgen.lightning_modules.shortcoti.scoring import (
    cfg_inputs,
    completion_mask,
    double_rows,
    score_cot,
    score_image,
    score_rollout,
    split_rows,
)

PROMPTS = ["a cube", "two blue spheres left of a green star on a plain white background", "three red rings"]


@pytest.fixture(scope="module")
def policy() -> JanusPolicy:
    return JanusPolicy.tiny(TinyJanusSpec(init_std=0.1), seed=0)


@pytest.fixture(scope="module")
def policy64() -> JanusPolicy:
    return JanusPolicy.tiny(TinyJanusSpec(init_std=0.15), seed=0).to(torch.float64)


def _image_prompt(policy, prompts=PROMPTS):
    t = PromptTemplate()
    return encode_left_padded(policy.tokenizer, [t.image_text(p, "") for p in prompts], policy.bos_token_id,
                              policy.pad_token_id, append_id=policy.boi_token_id)


# ------------------------------------------------------------------------------------------------ pure helpers
def test_completion_mask_covers_tokens_up_to_and_including_the_first_eos():
    ids = torch.tensor([[5, 6, 2, 0, 2], [5, 6, 7, 8, 9], [2, 0, 0, 0, 0]])
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(completion_mask(ids, eos_id=2), expected)


@pytest.mark.parametrize("layout", ["halves", "interleaved"])
def test_uncond_rows_hold_pad_everywhere_but_bos_and_boi(layout):
    bos, boi, pad = 1, 9, 0
    ids = torch.tensor([[0, 0, 1, 5, 6, 9], [1, 7, 7, 8, 3, 9]])
    mask = (ids != 0).long()
    ids2, mask2 = cfg_inputs(ids, mask, bos, boi, pad, layout)
    cond, uncond = split_rows(ids2, layout)
    assert torch.equal(cond, ids)
    assert torch.equal(uncond, torch.tensor([[0, 0, 1, 0, 0, 9], [1, 0, 0, 0, 0, 9]]))
    assert all(torch.equal(m, mask) for m in split_rows(mask2, layout))
    if layout == "interleaved":
        assert torch.equal(ids2[1], uncond[0]) and torch.equal(ids2[2], ids[1])
    assert torch.equal(double_rows(*split_rows(ids2, layout), layout), ids2)


def test_left_padding_and_truncation_keep_bos_and_the_tail(policy):
    ids, mask = encode_left_padded(policy.tokenizer, ["a red cube", "a cube"], 1, 0, append_id=4)
    assert ids[1, 0] == 0 and mask[1, 0] == 0 and ids[1, 1] == 1 and (ids[:, -1] == 4).all()
    short, m = encode_left_padded(policy.tokenizer, ["a red cube left of a star"], 1, 0, append_id=4, max_length=4)
    assert short.shape == (1, 4) and short[0, 0] == 1 and short[0, -1] == 4 and m.all()
    assert short[0, 1:3].tolist() == policy.tokenizer(["a star"], add_special_tokens=False)["input_ids"][0]


def test_sampling_configs_reject_bad_values():
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=0.0)
    with pytest.raises(ValueError, match="top_k"):
        ImageSamplingConfig(top_k=-1)
    with pytest.raises(ValueError, match="layout"):
        ImageSamplingConfig(layout="pairs")
    assert (SamplingConfig().top_k, SamplingConfig().top_p, ImageSamplingConfig().top_k) == (0, 1.0, 0)


# ------------------------------------------------------------------------------ recorded vs teacher-forced
@pytest.mark.parametrize("sampling", [SamplingConfig(max_new_tokens=12),
                                      SamplingConfig(max_new_tokens=12, temperature=0.7, top_k=20, top_p=0.9)])
def test_cot_teacher_forced_logprobs_equal_the_recorded_ones(policy, sampling):
    torch.manual_seed(0)
    cot = rollout_cot(policy, PROMPTS, sampling)
    lengths = cot.prompt_mask.sum(1)
    assert len(set(lengths.tolist())) == 3 and cot.ids.shape[1] >= 8
    with torch.no_grad():
        scored = score_cot(policy, cot.prompt_ids, cot.prompt_mask, cot.ids, sampling)
    m = cot.mask
    assert (scored[m] - cot.logp[m]).abs().max() <= 1e-5
    assert cot.logp[m].std() > 0.3  # a peaked, varied distribution, not a flat one
    wrong = score_cot(policy, cot.prompt_ids, cot.prompt_mask, cot.ids, SamplingConfig(temperature=2.0))
    assert (wrong[m] - cot.logp[m]).abs().max() > 1e-2


@pytest.mark.parametrize("layout", ["halves", "interleaved"])
def test_image_teacher_forced_logprobs_equal_the_recorded_ones_with_cfg_and_left_padding(policy, layout):
    sampling = ImageSamplingConfig(cfg=5.0, layout=layout)
    ids, mask = _image_prompt(policy)
    assert (mask == 0).any() and len(set(mask.sum(1).tolist())) == 3
    torch.manual_seed(0)
    rec = sample_image_tokens(policy, ids, mask, sampling)
    assert rec["tokens"].shape == (3, policy.num_image_tokens)
    with torch.no_grad():
        guided = score_image(policy, ids, mask, rec["tokens"], sampling)
        cond = score_image(policy, ids, mask, rec["tokens"], sampling, image_logp="cond")
        no_cfg = score_image(policy, ids, mask, rec["tokens"], ImageSamplingConfig(cfg=1.0, layout=layout))
    assert (guided - rec["logp"]).abs().max() <= 1e-5
    assert (cond - rec["cond_logp"]).abs().max() <= 1e-5
    assert (no_cfg - rec["logp"]).abs().max() > 1e-2  # the check sees the guidance
    assert rec["logp"].std() > 0.3


def test_image_logprobs_match_in_float64_with_temperature_and_truncation(policy64):
    sampling = ImageSamplingConfig(cfg=4.0, temperature=0.8, top_k=30, top_p=0.95)
    ids, mask = _image_prompt(policy64)
    gen = torch.Generator().manual_seed(3)
    rec = sample_image_tokens(policy64, ids, mask, sampling, generator=gen)
    assert rec["logp"].dtype == torch.float64
    with torch.no_grad():
        guided = score_image(policy64, ids, mask, rec["tokens"], sampling)
    assert (guided - rec["logp"]).abs().max() <= 1e-10


def test_score_rollout_is_differentiable_and_masks_the_cot(policy):
    cot_s, img_s = SamplingConfig(max_new_tokens=10), ImageSamplingConfig(cfg=3.0)
    torch.manual_seed(1)
    cot, image = two_level_rollout(policy, PROMPTS, cot_s, img_s, decode=False)
    out = score_rollout(policy, cot, image, cot_s, img_s)
    assert out["image_mask"].all() and out["image_logp"].shape == (3, policy.num_image_tokens)
    assert torch.equal(out["cot_logp"] == 0, ~cot.mask | (out["cot_logp"] == 0))
    (out["cot_logp"].sum() + out["image_logp"].sum()).backward()
    grad = policy.language_model.layers[0].self_attn.q_proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    policy.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------------------ against HF generate
@pytest.mark.parametrize("rows", [1, 3])
def test_own_image_loop_reproduces_hf_image_generate(policy, rows):
    """Same seed → same tokens as HF image-mode ``generate`` (top_k=0); a LogitsProcessor captures HF's raw
    [cond; uncond] logits per step, which equal the loop's when it is fed HF's tokens."""
    from transformers import LogitsProcessor

    class Capture(LogitsProcessor):
        def __init__(self):
            self.seen = []

        def __call__(self, input_ids, scores):
            self.seen.append(scores.clone())
            return scores

    ids, mask = _image_prompt(policy)
    ids, mask = ids[-rows:], mask[-rows:]
    cap = Capture()
    torch.manual_seed(7)
    hf = hf_image_generate(policy, ids, mask, ImageSamplingConfig(cfg=5.0), logits_processor=[cap])
    torch.manual_seed(7)
    ours = sample_image_tokens(policy, ids, mask, ImageSamplingConfig(cfg=5.0))
    assert torch.equal(ours["tokens"], hf)
    forced = sample_image_tokens(policy, ids, mask, ImageSamplingConfig(cfg=5.0), forced_tokens=hf,
                                 return_logits=True)
    raw = torch.stack(cap.seen, dim=1)
    assert raw.shape == (2 * rows, policy.num_image_tokens, 64)
    assert (raw[:rows] - forced["cond_logits"]).abs().max() <= 1e-5
    assert (raw[rows:] - forced["uncond_logits"]).abs().max() <= 1e-5
    assert (raw[:rows] - raw[rows:]).abs().max() > 1e-2


def test_static_cache_gives_the_same_rollout_as_the_dynamic_one(policy):
    from transformers import StaticCache

    ids, mask = _image_prompt(policy)
    sampling = ImageSamplingConfig(cfg=5.0)
    dynamic = sample_image_tokens(policy, ids, mask, sampling, generator=torch.Generator().manual_seed(5))
    cache = StaticCache(config=policy.model.config.text_config, max_cache_len=ids.shape[1] + policy.num_image_tokens)
    static = sample_image_tokens(policy, ids, mask, sampling, generator=torch.Generator().manual_seed(5), cache=cache)
    assert torch.equal(static["tokens"], dynamic["tokens"])
    assert (static["logp"] - dynamic["logp"]).abs().max() <= 1e-5


# ------------------------------------------------------------------------------------------- explicit sampling
# A nearly flat distribution with distinct logits (a ramp of 1e-3 in total): its top 50 are the 50 highest ids, and a
# sampler that applied HF's default top-k 50 would never draw below them. (On exact ties top-k keeps every tie.)
def _ramp(n: int) -> torch.Tensor:
    return torch.linspace(0.0, 1e-3, n)


def test_top_k_zero_draws_outside_the_top_50_on_a_flat_cot_distribution():
    policy = JanusPolicy.tiny(TinyJanusSpec(), seed=0)
    D, V = policy.model.config.text_config.hidden_size, policy.model.config.text_config.vocab_size
    head = torch.nn.Linear(D, V, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(_ramp(V))
    policy.model.lm_head = head
    prompts = ["a red cube"] * 8
    torch.manual_seed(0)
    flat = rollout_cot(policy, prompts, SamplingConfig(max_new_tokens=16))  # top_k=0 by default
    drawn = flat.ids[flat.mask]
    assert (drawn < V - 50).sum() > 0.5 * drawn.numel()
    expected = _ramp(V).log_softmax(-1)[drawn]
    assert torch.allclose(flat.logp[flat.mask], expected, atol=1e-6)
    torch.manual_seed(0)
    top50 = rollout_cot(policy, prompts, SamplingConfig(max_new_tokens=16, top_k=50))
    assert (top50.ids[top50.mask] >= V - 50).all()
    assert torch.allclose(top50.logp[top50.mask], torch.full_like(top50.logp[top50.mask], -torch.tensor(50.0).log()),
                          atol=1e-4)


def test_top_k_zero_draws_outside_the_top_50_on_a_flat_image_distribution():
    policy = JanusPolicy.tiny(TinyJanusSpec(codebook_size=128), seed=0)
    with torch.no_grad():
        policy.generation_head.vision_head.weight.zero_()
        policy.generation_head.vision_head.bias.copy_(_ramp(128))
    ids, mask = _image_prompt(policy, ["a red cube"] * 8)
    flat = sample_image_tokens(policy, ids, mask, ImageSamplingConfig(), generator=torch.Generator().manual_seed(0))
    assert (flat["tokens"] < 128 - 50).sum() > 0.5 * flat["tokens"].numel()
    assert torch.allclose(flat["logp"], _ramp(128).log_softmax(-1)[flat["tokens"]], atol=1e-6)
    top50 = sample_image_tokens(policy, ids, mask, ImageSamplingConfig(top_k=50),
                                generator=torch.Generator().manual_seed(0))
    assert (top50["tokens"] >= 128 - 50).all()


def test_image_rollout_has_exactly_the_image_token_count_and_uses_the_cot(policy):
    cot_s = SamplingConfig(max_new_tokens=6)
    torch.manual_seed(2)
    _, image = two_level_rollout(policy, PROMPTS[:2], cot_s, ImageSamplingConfig(),
                                 cot_texts=lambda c: ["red cube", ""])
    assert image.tokens.shape == (2, policy.num_image_tokens) and image.images.shape == (2, 8, 8, 3)
    text0 = policy.tokenizer.decode(image.prompt_ids[0][image.prompt_mask[0].bool()].tolist())
    assert "a cube . red cube" in text0 and text0.endswith("<begin_of_image>")
    text1 = policy.tokenizer.decode(image.prompt_ids[1][image.prompt_mask[1].bool()].tolist())
    assert ". " not in text1.split("<|Assistant|>")[0].split(":", 1)[1].strip()[-2:]
    other = rollout_image(policy, PROMPTS[:1], ["blue star"], ImageSamplingConfig(), decode=False)
    assert other.images is None and other.logp.shape == (1, policy.num_image_tokens)


# ------------------------------------------------------------------------------------------------------ benches
def _bench(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cpu_loop_bench_smoke(tmp_path):
    res = _bench("bench_shortcoti_loop").main(["--rows", "2", "--image-size", "32", "--repeats", "1",
                                               "--json", str(tmp_path / "b.json")])
    assert res["same_tokens_as_hf"] and res["image_tokens"] == 16 and (tmp_path / "b.json").exists()
    assert set(res["median_ms"]) == {"hf", "ours", "ours_static", "score"} and min(res["median_ms"].values()) > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_gpu_bench_exits_with_a_message_without_cuda():
    with pytest.raises(SystemExit, match="needs a CUDA device"):
        _bench("gpu_shortcoti").main(["--repeats", "1"])
