"""EMA callback: decay schedules, the average equals a hand-computed one, evaluation on the average (swapped back
after), checkpoints (frozen bases left out, live weights kept), test from a checkpoint, errors."""

from __future__ import annotations

import math

import pytest
import torch

from ctrlgen.callbacks import EMA
from ctrlgen.callbacks.ema import ema_decay, ema_update_
from tests.common.test_manual import _exact_fit
from tests.helpers.tiny_gan import ExactGANModule, exact_gan_data


# ------------------------------------------------------------------------------------------------------ pure functions
def test_decay_schedules():
    assert [ema_decay(t, 0.99) for t in (0, 5)] == [0.99, 0.99]
    assert ema_decay(0, 0.99, "power") == 0.0  # 1 - 1^-p: the first update copies
    assert ema_decay(3, 0.99, "power", power=0.5, inv_gamma=1.0) == pytest.approx(1 - 4 ** -0.5)
    assert ema_decay(10**9, 0.99, "power") == 0.99  # capped at decay
    assert ema_decay(2, 0.9, "ratio") == pytest.approx(3 / 12)
    assert ema_decay(1, 0.9, update_after_step=2) == 0.0 and ema_decay(2, 0.9, update_after_step=2) == 0.9
    assert ema_decay(0, 0.9, "power", min_decay=0.5) == 0.5
    with pytest.raises(ValueError, match="warmup must be one of"):
        ema_decay(0, 0.9, "cosine")


def test_update_formula():
    s, p = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -2.0])
    ema_update_([s], [p], 0.75)
    assert torch.allclose(s, torch.tensor([0.75 * 1 + 0.25 * 3, 0.75 * 2 - 0.25 * 2]))


# ------------------------------------------------------------------------------------------------------ in a fit
def _generator_init() -> dict[str, torch.Tensor]:
    return {f"generator.{n}": p.detach().clone() for n, p in ExactGANModule().generator.named_parameters()}


@pytest.mark.parametrize("k", [1, 2])
def test_average_equals_hand_computed_over_generator_steps(tmp_path, k):
    """6 iterations, generator every 2nd (3 steps), power warm-up: the average after each generator step is
    d_t·e + (1 - d_t)·p_t from the initial weights, d_t = 1 - (1 + t)^-0.5 capped at 0.8; with accumulation too."""
    ema = EMA(decay=0.8, targets=["generator"], optimizer="generator", warmup="power", power=0.5)
    m, _ = _exact_fit(tmp_path, iterations=6, batch_size=8 // k, k=k, callbacks=[ema])
    assert len(m.generator_after_step) == 3 and ema.num_updates == 3
    expected = _generator_init()
    for t, after in enumerate(m.generator_after_step):
        d = min(0.8, 1 - (1 + t) ** -0.5)
        for n, p in after.items():
            expected[f"generator.{n}"] = d * expected[f"generator.{n}"] + (1 - d) * p
    assert set(ema.shadow) == set(expected)
    for n, e in expected.items():
        assert torch.allclose(ema.shadow[n], e, atol=1e-12, rtol=0), n
        assert not torch.allclose(ema.shadow[n], m.state_dict()[n], atol=1e-6), n  # an average, not the live weights
    assert math.isclose(1 - 2 ** -0.5, ema_decay(1, 0.8, "power", power=0.5))


def test_default_selection_is_what_the_optimizer_steps_and_needs_a_name_with_two(tmp_path):
    ema = EMA(decay=0.5, optimizer="critic")
    m, _ = _exact_fit(tmp_path / "a", iterations=2, callbacks=[ema])
    assert set(ema.shadow) == {f"critic.{n}" for n, _ in m.critic.named_parameters()}  # no frozen., no generator.
    assert ema.num_updates == 2
    with pytest.raises(ValueError, match=r"has 2 optimizers \['generator', 'critic'\]; name the one"):
        _exact_fit(tmp_path / "b", iterations=1, callbacks=[EMA()])
    with pytest.raises(ValueError, match=r"optimizer 'gen' is not one of ExactGANModule's optimizers"):
        _exact_fit(tmp_path / "c", iterations=1, callbacks=[EMA(optimizer="gen")])
    with pytest.raises(ValueError, match=r"targets \['frozen'\] match no parameter the optimizer steps.*\['critic'\]"):
        _exact_fit(tmp_path / "d", iterations=1, callbacks=[EMA(optimizer="critic", targets=["frozen"])])


def test_validation_runs_on_the_average_and_swaps_back(tmp_path):
    ema = EMA(decay=0.9, targets=["generator"], optimizer="generator", use_ema_for_eval=True)
    snapshots: list[dict[str, torch.Tensor]] = []

    class Probe(ExactGANModule):
        def on_validation_start(self):
            super().on_validation_start()
            snapshots.append({n: ema.shadow[n].clone() for n in ema.shadow})

    m = Probe(update_every={"generator": 2}, max_iterations=4)
    m, _ = _exact_fit(tmp_path, iterations=4, val_every=2, callbacks=[ema], module=m)
    assert [it for it, _ in m.validated] == [2, 4]
    for (_, weights), shadow in zip(m.validated, snapshots, strict=True):
        for n, w in weights.items():
            assert torch.equal(w, shadow[f"generator.{n}"]), n  # evaluated on the average
    live = m.generator_after_step[-1]
    assert all(torch.equal(p, live[n]) for n, p in m.generator.named_parameters())  # swapped back after
    assert not all(torch.equal(ema.shadow[f"generator.{n}"], live[n]) for n in live)


def test_checkpoint_holds_average_without_frozen_base_and_test_evaluates_it(tmp_path):
    import lightning as L
    from torch.utils.data import DataLoader

    ema = EMA(decay=0.7, targets=["generator"], optimizer="generator", use_ema_for_eval=True)
    m, trainer = _exact_fit(tmp_path, iterations=4, callbacks=[ema])
    ckpt_path = tmp_path / "final.ckpt"
    trainer.save_checkpoint(ckpt_path)
    ckpt = torch.load(ckpt_path, weights_only=False)
    state = ckpt["callbacks"][ema.state_key]
    assert state["num_updates"] == 2 and set(state["shadow"]) == set(ema.shadow)
    assert not any(k.startswith("frozen.") for k in ckpt["state_dict"])  # frozen base out of the checkpoint
    for n, p in m.generator.named_parameters():
        assert torch.equal(ckpt["state_dict"][f"generator.{n}"], p)  # the live weights as the model's
    # saved while the average is swapped in: still the live weights
    ema.swap_in()
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    ema.on_save_checkpoint(trainer, m, {"state_dict": sd})
    ema.swap_out()
    assert all(torch.equal(sd[f"generator.{n}"], p) for n, p in m.generator.named_parameters())
    # a fresh process: test from the checkpoint runs on the average, restored from the callback state
    seen: list[dict[str, torch.Tensor]] = []

    class Probe(ExactGANModule):
        def test_step(self, batch, batch_idx, dataloader_idx=0):
            seen.append({n: p.detach().clone() for n, p in self.named_parameters()})
            return super().test_step(batch, batch_idx, dataloader_idx)

    fresh = EMA(decay=0.7, targets=["generator"], optimizer="generator", use_ema_for_eval=True)
    L.Trainer(accelerator="cpu", logger=False, callbacks=[fresh], enable_progress_bar=False).test(
        Probe(), DataLoader(exact_gan_data(4), batch_size=4), ckpt_path=ckpt_path, weights_only=False)
    assert len(seen) == 1
    for n, e in ema.shadow.items():
        assert torch.equal(seen[0][n], e), n
    assert torch.equal(seen[0]["critic.0.weight"], m.critic[0].weight)
