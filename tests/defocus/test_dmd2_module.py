"""DMD2Module on tiny random UNets (configs/defocus/dmd2_tiny.yaml), CPU: generator and fake score train, the teacher
stays bitwise fixed, TTUR turns, checkpoint contents (both optimizers, EMA, no teacher), exact resume."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from ctrlgen.lightning_modules.cli import CtrlgenCLI
from ctrlgen.lightning_modules.defocus.dmd2_module import DMD2Module

from tests.conftest import assert_same_state

CONFIG = "configs/defocus/dmd2_tiny.yaml"
WORDS = ["red", "blue", "cat", "dog", "house", "tree", "car", "sky"]


def write_dmd2_shards(out) -> dict[str, str]:
    """Prompt shards ({key}.txt) and real-latent shards ({key}.latent.npy (4, 8, 8) + caption) for the tiny recipe."""
    from ctrlgen.datamodules.shards import write_shards

    rng = np.random.default_rng(0)

    def npy(a):
        b = io.BytesIO()
        np.save(b, a)
        return b.getvalue()

    def text():
        return " ".join(rng.choice(WORDS, 3)).encode()

    write_shards(({"__key__": f"p{i:04d}", "txt": text()} for i in range(32)), f"{out}/prompts-%06d.tar")
    write_shards(({"__key__": f"v{i:04d}", "txt": text()} for i in range(4)), f"{out}/val-prompts-%06d.tar",
                 maxcount=2)  # 2 equal shards: splits over 2 ranks
    write_shards(({"__key__": f"r{i:04d}", "latent.npy": npy(rng.standard_normal((4, 8, 8)).astype(np.float32)),
                   "txt": text()} for i in range(32)), f"{out}/real-%06d.tar")
    return {"DMD2_PROMPTS": f"{out}/prompts-000000.tar", "DMD2_REAL": f"{out}/real-000000.tar",
            "DMD2_VAL_PROMPTS": f"{out}/val-prompts-{{000000..000001}}.tar"}


@pytest.fixture(scope="module")
def dmd2_env(tmp_path_factory):
    return write_dmd2_shards(tmp_path_factory.mktemp("dmd2_shards"))


def _fit(env, monkeypatch, root, *extra: str) -> CtrlgenCLI:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return CtrlgenCLI(args=["fit", "-c", CONFIG, f"--trainer.default_root_dir={root}",
                            "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
                            f"--trainer.logger.init_args.save_dir={root}",
                            "--trainer.callbacks+=ctrlgen.callbacks.RunCheckpoint", *extra])


def _snapshot(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


SEEN: dict[str, list] = {"k": [], "g": [], "f": []}  # filled by Recording during a fit


class Recording(DMD2Module):
    """Records the iterations of each update and the backward-simulation depths; keeps the initial weights."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.teacher_init = _snapshot(self.teacher)
        self.gen_init = _snapshot(self.generator)
        self.fake_init = _snapshot(self.guidance)

    def update(self, name, loss, clip_norm=None):
        out = super().update(name, loss, clip_norm)
        SEEN["g" if name == "generator" else "f"].append(self.iteration)
        return out

    def train_iteration(self, batch, batch_idx):
        super().train_iteration(batch, batch_idx)
        SEEN["k"].append(self.last_backsim)


def test_fit_trains_generator_and_fake_score_teacher_fixed(dmd2_env, monkeypatch, tmp_path):
    seen = SEEN
    for v in seen.values():
        v.clear()
    cli = _fit(dmd2_env, monkeypatch, tmp_path, "--model.class_path=tests.defocus.test_dmd2_module.Recording")
    m = cli.model
    assert m.iteration == 8 and cli.trainer.global_step == 8 + 4
    assert seen["g"] == [0, 2, 4, 6] and seen["f"] == list(range(8))  # TTUR: generator every 2nd iteration
    assert set(seen["k"]) <= {0, 1, 2, 3} and len(set(seen["k"])) > 1
    for n, p in m.teacher.named_parameters():
        assert torch.equal(p, m.teacher_init[n]) and not p.requires_grad, n  # bitwise fixed
    assert any(not torch.equal(p, m.gen_init[n]) for n, p in m.generator.named_parameters())
    assert any(not torch.equal(p, m.fake_init[n]) for n, p in m.guidance.named_parameters() if n.startswith("head"))
    assert any(not torch.equal(p, m.fake_init[n]) for n, p in m.guidance.named_parameters()
               if n.startswith("fake_score"))
    assert all(p.grad is None for p in m.parameters())  # zero_grad(set_to_none) after every step

    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    keys = ckpt["state_dict"].keys()
    assert not any(k.startswith(("teacher.", "prompt_encoder.")) for k in keys)
    assert any(k.startswith("generator.") for k in keys) and any(k.startswith("guidance.head.") for k in keys)
    assert any(k.startswith("guidance.fake_score.") for k in keys)
    assert len(ckpt["optimizer_states"]) == 2 and all(s["state"] for s in ckpt["optimizer_states"])
    assert set(ckpt["ctrlgen_bases"]) == {"teacher", "prompt_encoder"}  # provenance only (random: None)
    ema = [v for k, v in ckpt["callbacks"].items() if k.startswith("EMA")]
    assert len(ema) == 1 and ema[0]["num_updates"] == 4
    assert set(ema[0]["shadow"]) == {f"generator.{n}" for n, _ in m.generator.named_parameters()}
    assert ckpt["ctrlgen_iteration"] == 8


def test_resume_reproduces_uninterrupted_run(dmd2_env, monkeypatch, tmp_path):
    """6 iterations straight == 3, resume from last.ckpt, 3 more: weights, EMA and both optimizers' states."""
    from ctrlgen.callbacks import EMA

    common = ("--trainer.val_check_interval=null", "--trainer.limit_val_batches=0")
    a = _fit(dmd2_env, monkeypatch, tmp_path / "a", "--model.init_args.max_iterations=6", *common)
    _fit(dmd2_env, monkeypatch, tmp_path / "b", "--model.init_args.max_iterations=3", *common)
    b = _fit(dmd2_env, monkeypatch, tmp_path / "b", "--model.init_args.max_iterations=6", "--ckpt_path=last",
             *common)
    assert a.model.iteration == b.model.iteration == 6 and a.trainer.global_step == b.trainer.global_step == 9
    assert_same_state(a.model.state_dict(), b.model.state_dict(), atol=1e-6)
    ema_a, ema_b = (next(c for c in cli.trainer.callbacks if isinstance(c, EMA)) for cli in (a, b))
    assert ema_a.num_updates == ema_b.num_updates == 3
    assert_same_state(ema_a.shadow, ema_b.shadow, atol=1e-6)
    for name in ("generator", "guidance"):
        sa, sb = (cli.model.optimizer(name).state_dict()["state"] for cli in (a, b))
        for i in sa:
            assert torch.allclose(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"], atol=1e-9, rtol=0)
