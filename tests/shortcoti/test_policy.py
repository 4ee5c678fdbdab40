"""The Janus policy: offline tokenizer and tiny model, local loading, what trains (spec §3.1, §4, §8.11–8.12)."""

from __future__ import annotations

import pytest
import torch
from ctrlgen.lightning_modules.common.rollouts import (
    group_advantages,
    repeat_for_groups,
)
from ctrlgen.lightning_modules.shortcoti.grpo import (
    LossConfig,
    concat_segments,
    t2i_r1_loss,
)
from ctrlgen.lightning_modules.shortcoti.policy import (
    FROZEN_PREFIXES,
    SPECIAL_TOKENS,
    JanusPolicy,
    TinyJanusSpec,
    build_world_tokenizer,
)
from ctrlgen.lightning_modules.shortcoti.rollout import (
    ImageSamplingConfig,
    SamplingConfig,
    two_level_rollout,
)
from ctrlgen.lightning_modules.shortcoti.scoring import score_rollout



@pytest.fixture(scope="module")
def policy() -> JanusPolicy:
    return JanusPolicy.tiny(TinyJanusSpec(init_std=0.1), seed=0)


def test_world_tokenizer_round_trips_through_save_pretrained(tmp_path):
    from transformers import AutoTokenizer

    tok = build_world_tokenizer()
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    text = "Two red cubes left of a blue sphere. <begin_of_image>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert loaded(text, add_special_tokens=False)["input_ids"] == ids
    assert tok.unk_token_id not in ids and ids[-1] == tok.convert_tokens_to_ids(SPECIAL_TOKENS["boi"])
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2) and loaded.padding_side == "left"
    assert tok(["zebra"], add_special_tokens=False)["input_ids"] == [[tok.unk_token_id]]
    assert loaded.decode(ids, skip_special_tokens=True) == "two red cubes left of a blue sphere ."


def test_tiny_policy_generates_text_and_image_tokens_and_decodes(policy):
    ids = torch.tensor([[policy.bos_token_id, 20, 45, policy.boi_token_id]])
    text = policy.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_mode="text",
                                 do_sample=False, max_new_tokens=10, min_new_tokens=10,
                                 pad_token_id=policy.pad_token_id)
    assert text.shape == (1, 14)
    _, image = two_level_rollout(policy, ["a red cube"], SamplingConfig(max_new_tokens=10), ImageSamplingConfig())
    assert image.tokens.shape == (1, 16) and int(image.tokens.max()) < 64
    assert image.images.shape == (1, 8, 8, 3) and image.images.dtype == torch.uint8


def test_save_and_load_a_local_directory(policy, tmp_path):
    policy.save_pretrained(tmp_path / "janus")
    loaded = JanusPolicy.from_pretrained(tmp_path / "janus")
    a, b = policy.model.state_dict(), loaded.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (loaded.boi_token_id, loaded.num_image_tokens) == (policy.boi_token_id, 16)
    assert loaded.tokenizer.get_vocab() == policy.tokenizer.get_vocab()
    assert not any(p.requires_grad for n, p in loaded.model.named_parameters() if n.startswith(FROZEN_PREFIXES))


def test_missing_or_incomplete_directory_fails_naming_it(policy, tmp_path):
    missing = tmp_path / "no-such-janus"
    with pytest.raises(FileNotFoundError, match="no-such-janus.*not found"):
        JanusPolicy.from_pretrained(missing)
    policy.model.save_pretrained(tmp_path / "model-only")
    with pytest.raises(FileNotFoundError, match="model-only.*tokenizer_config.json"):
        JanusPolicy.from_pretrained(tmp_path / "model-only")


def test_only_the_language_model_trains(policy):
    names = {n for n, p in policy.model.named_parameters() if p.requires_grad}
    assert names and all(n.startswith(("model.language_model.", "lm_head.")) for n in names)
    frozen = {n for n, p in policy.model.named_parameters() if not p.requires_grad}
    for prefix in FROZEN_PREFIXES:
        assert any(n.startswith(prefix) for n in frozen), prefix
    assert {id(p) for p in policy.trainable_parameters()} == {id(p) for p in policy.model.parameters()
                                                              if p.requires_grad}
    policy.train()
    assert policy.language_model.training and not policy.generation_head.training
    assert not policy.model.model.vqmodel.training and not policy.model.model.vision_model.training
    policy.eval()


def test_frozen_parts_bitwise_unchanged_after_a_grpo_step():
    policy = JanusPolicy.tiny(TinyJanusSpec(init_std=0.1), seed=1)
    frozen_before = policy.frozen_state()
    lm_before = {n: p.detach().clone() for n, p in policy.model.named_parameters() if p.requires_grad}
    G = 4
    prompts = repeat_for_groups(["a red cube", "two blue spheres left of a green star"], G)
    cot_s, img_s = SamplingConfig(max_new_tokens=8), ImageSamplingConfig(cfg=3.0)
    torch.manual_seed(0)
    cot, image = two_level_rollout(policy, prompts, cot_s, img_s, decode=False)
    rewards = torch.randn(len(prompts), generator=torch.Generator().manual_seed(0))
    adv = group_advantages(rewards, G)
    opt = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-2, weight_decay=0.1)
    policy.train()
    scored = score_rollout(policy, cot, image, cot_s, img_s)
    ref = concat_segments(cot.logp, image.logp)  # a reference that sampled the rollout (k3 KL 0 in value)
    loss, _ = t2i_r1_loss(scored["cot_logp"], scored["cot_mask"], scored["image_logp"], scored["image_mask"], adv,
                          ref[:, :cot.logp.shape[1]], ref[:, cot.logp.shape[1]:], LossConfig.t2i_r1())
    loss.backward()
    assert policy.generation_head.vision_head.weight.grad is None  # on the image log-prob path, yet frozen
    opt.step()
    after = policy.frozen_state()
    assert after.keys() == frozen_before.keys() and len(after) > 20
    assert all(torch.equal(after[k], frozen_before[k]) for k in after)
    changed = [n for n, p in policy.model.named_parameters() if p.requires_grad and not torch.equal(p, lm_before[n])]
    assert len(changed) > 0.5 * len(lm_before)
