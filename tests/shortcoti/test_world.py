"""The demo world: prompts, token scenes, the analytic checker and verbose CoTs; the configs parse and build."""

from __future__ import annotations

import random

import pytest
import torch
from ctrlgen.lightning_modules.shortcoti import world as w
from ctrlgen.lightning_modules.shortcoti.policy import build_world_tokenizer


def test_prompts_parse_and_split_without_leaks():
    assert w.parse_prompt("a red cube and three blue stars") == [(1, "red", "cube"), (3, "blue", "star")]
    train, val = w.split_prompts(200, 16)
    assert len(train) == 200 and len(val) == 16
    assert not {p["prompt"] for p in val} & {p["prompt"] for p in train}
    assert sum(p["difficulty"] == "hard" for p in val) == 8
    assert all(len(w.parse_prompt(p["prompt"])) == (2 if p["difficulty"] == "hard" else 1) for p in train)


def test_checker_scores_golden_scenes():
    p = "two red cubes and a blue star"
    red, blue, green = w.object_code("red", "cube"), w.object_code("blue", "star"), w.object_code("green", "ring")
    bg = [17] * 13
    assert w.check(p, w.render(p, random.Random(0))) == 1.0
    assert w.check(p, [red, red, blue] + bg) == 1.0
    assert w.check(p, [red, blue] + bg + [17]) == pytest.approx((0.2 + 1.0) / 2)        # wrong count
    assert w.check(p, [red, red] + bg + [17]) == pytest.approx(0.5)                       # one group absent
    assert w.check(p, [red, red, blue, green] + bg[:12]) == pytest.approx(1 - 1 / 16)    # a spurious object
    tokens = torch.tensor([[red, red, blue] + bg, [17] * 16])
    assert w.SceneChecker()([p, p], [{}, {}], tokens, None).tolist() == [1.0, 0.0]


def test_cots_are_verbose_plans_in_the_policy_vocabulary():
    tok = build_world_tokenizer()
    rng = random.Random(0)
    cots = [w.make_cot("a green ring and two yellow cubes", rng) for _ in range(50)]
    assert all(c.startswith("draw : a green ring , two yellow cubes .") for c in cots)
    lengths = {len(c.split()) for c in cots}
    assert min(lengths) == 10 and max(lengths) > 30  # the plan alone is 10 words
    for c in cots:
        assert tok.unk_token_id not in tok(c, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("config", ["configs/shortcoti/demo.yaml", "configs/shortcoti/janus_pro_1b.yaml"])
def test_shortcoti_configs_instantiate(config, tmp_path):
    """The demo builds a random tiny Janus (janus_path null); the paper-scale recipe parses (its weights are local)."""
    from ctrlgen.lightning_modules.cli import CtrlgenCLI
    from ctrlgen.lightning_modules.shortcoti.module import ShortCoTIModule

    args = ["-c", config, f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false",
            "--trainer.callbacks=[]", "--model.init_args.janus_path=null", "--model.init_args.dtype=null",
            "--model.init_args.tiny={init_std: 0.02}", "--trainer.precision=32-true"]
    cli = CtrlgenCLI(args=args, run=False)
    assert isinstance(cli.model, ShortCoTIModule) and cli.model.rewards
    assert sum(p.numel() for p in cli.model.parameters() if p.requires_grad) > 0


def test_pretraining_lowers_the_world_nll_and_refreezes_generation_parts():
    from ctrlgen.lightning_modules.shortcoti.policy import JanusPolicy, TinyJanusSpec
    from ctrlgen.lightning_modules.shortcoti.pretrain import pretrain_on_world

    policy = JanusPolicy.tiny(TinyJanusSpec(), seed=0)
    vq = {k: v.clone() for k, v in policy.model.model.vqmodel.state_dict().items()}
    head = [p.detach().clone() for p in policy.generation_head.parameters()]
    train, _ = w.split_prompts(32, 4)
    hist = pretrain_on_world(policy, [p["prompt"] for p in train], steps=30, batch_size=8, log_every=29)
    assert hist[-1]["loss"] < hist[0]["loss"] - 1.0
    assert any(not torch.equal(a, b) for a, b in zip(head, policy.generation_head.parameters()))  # the generation head learns the world here
    assert not any(p.requires_grad for p in policy.generation_head.parameters())
    assert all(torch.equal(vq[k], v) for k, v in policy.model.model.vqmodel.state_dict().items())
