"""PromptDataModule (JSONL/TXT/tar, rank splits, exact resume, bad input), GRPO rollout maths, and a toy policy that learns."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ctrlgen.datamodules.prompts import PromptDataModule
from ctrlgen.datamodules.shards import SKIPS, write_shards
from ctrlgen.lightning_modules.common.rollouts import (
    group_advantages,
    group_stats,
    repeat_for_groups,
)
from tests.conftest import run_cli_recorded


def _jsonl(path, n: int, extra: str = "") -> str:
    lines = [json.dumps({"prompt": f"a photo of thing {i}", "target": i % 8, "task_type": "toy"}) for i in range(n)]
    path.write_text("\n".join(lines) + "\n" + extra)
    return str(path)


def _dm(src, rank=0, world=1, **kw) -> PromptDataModule:
    dm = PromptDataModule(train_prompts=src, **kw)
    dm.rank_and_world = (rank, world)
    dm.setup("fit")
    return dm


# ------------------------------------------------------------------------------------------------------ loading
def test_sources_jsonl_txt_tar(tmp_path):
    dm = _dm(_jsonl(tmp_path / "p.jsonl", 6), prompts_per_batch=4)
    b = next(iter(dm.train_dataloader()))
    assert len(b["prompt"]) == 4 and b["index"].dtype == torch.int64 and b["valid"].all()
    assert b["meta"][0]["task_type"] == "toy" and "prompt" not in b["meta"][0]
    assert b["prompt"][0] == dm.prompts["train"][int(b["index"][0])]["prompt"]
    (tmp_path / "p.txt").write_text("first prompt\n\n  second prompt  \n")
    assert [p["prompt"] for p in _dm(str(tmp_path / "p.txt")).prompts["train"]] == ["first prompt", "second prompt"]
    write_shards([{"__key__": "s0", "json": {"prompt": "from json", "nouns": ["cat"]}}, {"__key__": "s1", "txt": "from txt"}],
                 str(tmp_path / "p-%06d.tar"))
    got = _dm(str(tmp_path / "p-000000.tar")).prompts["train"]
    assert [(p["prompt"], p["meta"]) for p in got] == [("from json", {"nouns": ["cat"]}), ("from txt", {})]


def test_bad_lines_fail_with_file_and_line(tmp_path):
    src = _jsonl(tmp_path / "bad.jsonl", 3, extra='{"prompt": "ok"\n')
    with pytest.raises(ValueError, match=r"data\.train_prompts: .*bad\.jsonl:4: not valid JSON .*found '\{\"prompt\": \"ok\"'"):
        _dm(src)
    src = _jsonl(tmp_path / "noprompt.jsonl", 2, extra='{"caption": "x"}\n')
    with pytest.raises(ValueError, match=r"noprompt\.jsonl:3: no non-empty string 'prompt' field \(keys: \['caption'\]\)"):
        _dm(src)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match=r"no prompts found in .*empty\.jsonl"):
        _dm(str(tmp_path / "empty.jsonl"))
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl"):
        _dm(str(tmp_path / "missing.jsonl"))


def test_bad_lines_skipped_and_counted(tmp_path):
    src = _jsonl(tmp_path / "bad.jsonl", 3, extra="not json\n[1, 2]\n")
    before = SKIPS.total
    with pytest.warns(UserWarning, match=r"bad\.jsonl:4"):
        dm = _dm(src, on_bad="skip")
    assert len(dm.prompts["train"]) == 3 and SKIPS.total - before == 2


# ------------------------------------------------------------------------------------------------------ splits
def _epoch(dm, loader=None):
    return [int(i) for b in (loader or dm.train_dataloader()) for i in b["index"]]


@pytest.mark.parametrize("n,world", [(10, 2), (10, 3), (7, 4)])
def test_train_split_disjoint_and_covering(tmp_path, n, world):
    src = _jsonl(tmp_path / "p.jsonl", n)
    loaders = [_dm(src, r, world).train_dataloader() for r in range(world)]
    for _ in range(2):  # two epochs
        per = [_epoch(None, ld) for ld in loaders]
        assert all(len(p) == n // world for p in per)  # equal counts per rank
        flat = [i for p in per for i in p]
        assert len(set(flat)) == len(flat) == n - n % world  # disjoint; only the remainder is dropped
    assert len({tuple(_epoch(None, loaders[0])) for _ in range(3)}) > 1  # each epoch a new permutation


def test_eval_each_prompt_once_and_equal_batches(tmp_path):
    src = _jsonl(tmp_path / "p.jsonl", 7)
    seen, nbatches = [], set()
    for r in range(3):
        dm = PromptDataModule(val_prompts=src, eval_prompts_per_batch=2, num_workers=2)
        dm.rank_and_world = (r, 3)
        dm.setup("validate")
        batches = list(dm.val_dataloader())
        nbatches.add(len(batches))
        seen += [int(i) for b in batches for i, ok in zip(b["index"], b["valid"]) if ok]
    assert nbatches == {2} and sorted(seen) == list(range(7))


def test_workers_do_not_change_order(tmp_path):
    src = _jsonl(tmp_path / "p.jsonl", 12)
    assert _epoch(_dm(src, num_workers=2, prompts_per_batch=2)) == _epoch(_dm(src, num_workers=0, prompts_per_batch=2))


def test_exact_resume_datamodule(tmp_path):
    src = _jsonl(tmp_path / "p.jsonl", 9)  # 4 batches of 2 per epoch
    dm = _dm(src, prompts_per_batch=2)
    loader = dm.train_dataloader()
    straight = _epoch(dm, loader) + _epoch(dm, loader)
    half = _dm(src, prompts_per_batch=2)
    half.trainer = SimpleNamespace(training=True, current_epoch=2, global_rank=0, world_size=1)
    loader = half.train_dataloader()
    _epoch(half, loader)
    for b in loader:  # epoch 1: consume 1 batch
        half.on_after_batch_transfer(b, 0)
        break
    assert half.state_dict() == {"epoch": 1, "consumed": 1}  # the stream's epoch, whatever the trainer's counter says
    resumed = _dm(src, prompts_per_batch=2)
    resumed.load_state_dict(half.state_dict())
    loader = resumed.train_dataloader()
    assert _epoch(resumed, loader) == straight[10:]
    assert len(_epoch(resumed, loader)) == 8  # then full epochs again


# ------------------------------------------------------------------------------------------------- rollout maths
def test_repeat_for_groups():
    assert repeat_for_groups(torch.tensor([1, 2]), 3).tolist() == [1, 1, 1, 2, 2, 2]
    assert repeat_for_groups(["a", "b"], 2) == ["a", "a", "b", "b"]
    assert repeat_for_groups({"p": ["a"], "i": torch.tensor([[5]])}, 2)["i"].tolist() == [[5], [5]]


def test_group_advantages_hand_computed():
    r = torch.tensor([1.0, 0, 0, 0, 1, 1, 0, 0])
    # group 1: mean 0.25, unbiased std sqrt((0.75² + 3·0.25²) / 3) = 0.5; group 2: mean 0.5, std sqrt(1/3)
    g1 = [0.75 / 0.5001] + [-0.25 / 0.5001] * 3
    s2 = (1 / 3) ** 0.5 + 1e-4
    expect = torch.tensor(g1 + [0.5 / s2, 0.5 / s2, -0.5 / s2, -0.5 / s2])
    assert torch.allclose(group_advantages(r, 4, "group"), expect, atol=1e-6)
    # batch: mean 3/8, unbiased std over all 8 = sqrt((3·(5/8)² + 5·(3/8)²) / 7) = sqrt(1.875 / 7)
    sb = (1.875 / 7) ** 0.5 + 1e-4
    assert torch.allclose(group_advantages(r, 4, "batch"), torch.tensor([0.75, -.25, -.25, -.25, .5, .5, -.5, -.5]) / sb)
    assert group_advantages(r, 4, "none").tolist() == [0.75, -0.25, -0.25, -0.25, 0.5, 0.5, -0.5, -0.5]
    assert group_advantages(torch.ones(4), 2).tolist() == [0, 0, 0, 0]  # zero-std groups: no signal, no NaN
    with pytest.raises(ValueError, match="G >= 2"):
        group_advantages(r, 1, "group")
    with pytest.raises(ValueError, match="B\\*G"):
        group_advantages(r, 3)


def test_group_stats():
    s = group_stats(torch.tensor([1.0, 1, 0, 1, 2, 2]), 2)
    assert s["reward"].item() == pytest.approx(7 / 6)
    assert s["reward_std"].item() == pytest.approx((0 + 2**0.5 / 2 + 0) / 3)  # unbiased std of (0, 1) is 1/√2
    assert s["frac_zero_std"].item() == pytest.approx(2 / 3)


# ------------------------------------------------------------------------------------------------- toy policy
def _fit(src, root, steps, extra=()):
    from ctrlgen.lightning_modules.cli import CtrlgenCLI

    return CtrlgenCLI(args=["fit", "-c", "tests/configs/tiny_policy.yaml", f"--data.init_args.train_prompts={src}",
                            f"--trainer.max_steps={steps}", f"--trainer.default_root_dir={root}", *extra])


def test_toy_policy_learns(tmp_path):
    """Honest learning check: 48 GRPO steps on 16 prompts lift the mean rollout reward from ≈1/8 by more than 0.3."""
    cli = _fit(_jsonl(tmp_path / "p.jsonl", 16), tmp_path / "run", 48)
    h = cli.model.reward_history
    assert len(h) == 48
    first, last = float(np.mean(h[:8])), float(np.mean(h[-8:]))
    assert last > first + 0.3, (first, last, h)
    assert "train/frac_zero_std" in cli.trainer.logged_metrics


def test_toy_policy_resume_is_exact(tmp_path):
    src = _jsonl(tmp_path / "p.jsonl", 10)  # 2 batches of 4 per epoch: the split lands mid-epoch 1
    straight = _fit(src, tmp_path / "a", 6)
    _fit(src, tmp_path / "b", 3)
    resumed = _fit(src, tmp_path / "b", 6, ["--ckpt_path=last"])
    assert resumed.model.seen_prompts == straight.model.seen_prompts[3:]
    assert resumed.model.seen_tokens == straight.model.seen_tokens[3:]  # per-rank generator restored
    assert torch.allclose(resumed.model.logits.weight, straight.model.logits.weight, atol=1e-6)


RECORD = """
import json, os
import lightning as L
class Record(L.Callback):
    def on_train_end(self, trainer, pl_module):
        out = {"prompts": pl_module.seen_prompts, "tokens": pl_module.seen_tokens}
        open(os.environ["CTRLGEN_TEST_OUT"] + f"/rank{trainer.global_rank}.json", "w").write(json.dumps(out))
"""


@pytest.mark.slow
def test_toy_policy_two_ranks(tmp_path):
    src = _jsonl(tmp_path / "p.jsonl", 16)  # 2 ranks × 2 batches of 4 per epoch
    args = ["fit", "-c", "tests/configs/tiny_policy.yaml", "-c", "configs/trainer/ddp_cpu.yaml",
            f"--data.init_args.train_prompts={src}", "--trainer.max_steps=4", f"--trainer.default_root_dir={tmp_path / 'run'}"]
    _, ranks = run_cli_recorded(tmp_path, RECORD, args)
    assert len(ranks[0]["prompts"]) == len(ranks[1]["prompts"]) == 4
    for epoch in (slice(0, 2), slice(2, 4)):
        p0 = {p for b in ranks[0]["prompts"][epoch] for p in b}
        p1 = {p for b in ranks[1]["prompts"][epoch] for p in b}
        assert not p0 & p1 and len(p0 | p1) == 16  # disjoint, covering the set each epoch
    assert ranks[0]["tokens"] != ranks[1]["tokens"]  # rollouts drawn from per-rank generators
