"""ManualOptimModule: named optimizers from YAML, per-optimizer updates, TTUR, iteration counter, exact resume, errors.

Most assertions share one real 4-iteration ``ctrlgen fit`` of the tiny GAN (tests/configs/tiny_gan.yaml, shapes shards):
generator every 2nd iteration, critic every iteration, both with schedulers.
"""

from __future__ import annotations

import csv
from typing import Any

import pytest
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException

from ctrlgen.lightning_modules.cli import CtrlgenCLI
from ctrlgen.lightning_modules.common.manual import ManualOptimModule
from tests.conftest import assert_same_state
from tests.helpers.tiny_gan import ExactGANModule, TinyGANModule, exact_gan_data

CONFIG = "tests/configs/tiny_gan.yaml"
G_PARAMS = {f"generator.{n}" for n, _ in TinyGANModule().generator.named_parameters()}
C_PARAMS = {f"critic.{n}" for n, _ in TinyGANModule().critic.named_parameters()}


class RecordingGAN(TinyGANModule):
    """Records, per update, which parameters changed, and the grads/requires_grad left behind."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.updates: list[dict[str, Any]] = []
        self.frozen_init = self.frozen.weight.detach().clone()

    def update(self, name, loss, clip_norm=None):
        before = {n: p.detach().clone() for n, p in self.named_parameters()}
        requires = {n: p.requires_grad for n, p in self.named_parameters()}
        seen = {}

        def recording_loss():  # which parameters can receive gradients while the loss is built
            seen["trainable"] = {n for n, p in self.named_parameters() if p.requires_grad}
            return loss()

        out = super().update(name, recording_loss, clip_norm)
        self.updates.append({
            "iteration": self.iteration, "name": name, "trainable_in_loss": seen["trainable"],
            "changed": {n for n, p in self.named_parameters() if not torch.equal(p, before[n])},
            "delta": torch.linalg.vector_norm(torch.cat([(p.detach() - before[n]).flatten()
                                                         for n, p in self.named_parameters()])).item(),
            "grads_left": [n for n, p in self.named_parameters() if p.grad is not None],
            "requires_restored": requires == {n: p.requires_grad for n, p in self.named_parameters()}})
        return out


def _args(shards: dict[str, str], root, *extra: str) -> list[str]:
    return ["-c", CONFIG, f"--data.init_args.train_shards={shards['train']}",
            f"--data.init_args.val_shards={shards['val']}", f"--trainer.default_root_dir={root}", *extra]


def _fit(shards, root, *extra: str) -> CtrlgenCLI:
    return CtrlgenCLI(args=["fit", *_args(shards, root, *extra)])


@pytest.fixture(scope="module")
def gan_run(shapes_shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("gan")
    cli = _fit(shapes_shards, root, "--model.class_path=tests.common.test_manual.RecordingGAN")
    return cli, root


# ------------------------------------------------------------------------------------------------------ YAML injection
def test_yaml_named_optimizers_and_schedulers_parse(shapes_shards, tmp_path):
    """jsonargparse 4.53 takes ``dict[str, OptimizerCallable]`` (and schedulers) from class_path/init_args entries."""
    cli = CtrlgenCLI(args=_args(shapes_shards, tmp_path, "--trainer.logger=false",
                                "--model.init_args.optimizers.critic.init_args.lr=5.0e-4"), run=False)
    m = cli.model
    assert isinstance(m, TinyGANModule) and not m.automatic_optimization
    assert set(m.optimizer_factories) == {"generator", "critic"} and set(m.scheduler_factories) == {"generator", "critic"}
    assert m.update_every == {"generator": 2} and m.clip_norm == {"generator": 1.0, "critic": 10.0}
    opts, scheds = m.configure_optimizers()
    g, c = opts
    assert type(g) is torch.optim.AdamW and g.defaults["betas"] == (0.0, 0.99) and g.defaults["lr"] == 2e-3
    assert type(c) is torch.optim.Adam and c.defaults["lr"] == 5e-4  # the dotted CLI override reached the dict entry
    assert {id(p) for p in g.param_groups[0]["params"]} == {id(p) for p in m.generator.parameters()}
    assert {id(p) for p in c.param_groups[0]["params"]} == {id(p) for p in m.critic.parameters()}
    assert [type(s["scheduler"]) for s in scheds] == [torch.optim.lr_scheduler.LinearLR, torch.optim.lr_scheduler.StepLR]
    assert [s["scheduler"].optimizer for s in scheds] == [g, c] and [s["name"] for s in scheds] == ["lr-generator",
                                                                                                       "lr-critic"]
    assert "optimizers" not in m.hparams and m.hparams["max_iterations"] == 4
    with pytest.raises(KeyError, match=r"no optimizer 'gen'; optimizers are \['generator', 'critic'\]"):
        m.is_turn("gen")


def test_default_optimizers_and_no_schedulers():
    m = TinyGANModule()
    opts = m.configure_optimizers()  # no schedulers: a plain list
    assert [type(o) for o in opts] == [torch.optim.AdamW, torch.optim.AdamW]


def test_global_batch_lr_and_schedules_per_optimizer():
    """lr_reference_batch scales every optimizer by the global batch (no accumulation under manual optimisation); a
    ``total_steps: null`` schedule is bound to that optimizer's own updates: ⌈max_iterations / update_every⌉."""
    from types import SimpleNamespace

    from ctrlgen.lightning_modules.common.schedules import WarmupLinear

    m = TinyGANModule(optimizers={"generator": lambda p: torch.optim.AdamW(p, lr=1e-4),
                                  "critic": lambda p: torch.optim.AdamW(p, lr=2e-4)},
                      schedulers={"generator": lambda o: WarmupLinear(o, total_steps=None, warmup_frac=0.1),
                                  "critic": lambda o: WarmupLinear(o, total_steps=None)},
                      update_every={"generator": 5}, max_iterations=101, lr_reference_batch=256)
    m._trainer = SimpleNamespace(datamodule=SimpleNamespace(batch_size=64), world_size=8, accumulate_grad_batches=3,
                                 max_steps=-1, max_epochs=-1, limit_train_batches=1.0)
    (g, c), (gs, cs) = m.configure_optimizers()
    assert [o.param_groups[0]["initial_lr"] for o in (g, c)] == pytest.approx([2e-4, 4e-4])  # x 512 / 256
    assert (gs["scheduler"].total_steps, gs["scheduler"].warmup_steps, cs["scheduler"].total_steps) == (21, 2, 101)
    m.max_iterations = None  # neither max_iterations nor an epoch length: max_steps counts all optimizers' steps
    m._trainer.max_steps = 500
    with pytest.raises(ValueError, match="total_steps: null needs a bounded run"):
        m.configure_optimizers()


# ------------------------------------------------------------------------------------------------------ a real fit
def test_fit_iterations_turns_and_global_step(gan_run):
    """Pins lightning 2.6.6: under manual optimisation global_step counts optimizer.step() calls, not iterations."""
    cli, root = gan_run
    m, trainer = cli.model, cli.trainer
    assert m.iteration == 4 and len(m.seen_noise) == 4
    assert [(u["iteration"], u["name"]) for u in m.updates] == [
        (0, "generator"), (0, "critic"), (1, "critic"), (2, "generator"), (2, "critic"), (3, "critic")]
    assert trainer.global_step == 6  # 2 generator + 4 critic steps over 4 iterations
    assert trainer.fit_loop.epoch_loop._batches_that_stepped == 4  # the logger's x-axis counts iterations
    g_sched, c_sched = m.scheduler("generator"), m.scheduler("critic")
    assert g_sched.last_epoch == 2 and c_sched.last_epoch == 4  # each scheduler stepped with its own optimizer
    assert m.optimizer("critic").param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5**2)
    assert m.optimizer("generator").param_groups[0]["lr"] == pytest.approx(2e-3 * (0.1 + 0.9 * 2 / 10))
    with open(next(root.rglob("metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    for name in ("generator", "critic"):
        for key in ("loss", "lr", "grad_norm"):
            assert any(r.get(f"train/{name}/{key}") for r in rows), f"train/{name}/{key} not logged"
    norms = [float(r["train/critic/grad_norm"]) for r in rows if r.get("train/critic/grad_norm")]
    assert all(n > 0 for n in norms)


def test_max_steps_counts_optimizer_steps(shapes_shards, tmp_path):
    """trainer.max_steps=5 with no max_iterations: steps 2 (it 0: G+C), 3 (it 1: C), 5 (it 2: G+C) -> 3 iterations."""
    cli = _fit(shapes_shards, tmp_path, "--model.init_args.max_iterations=null", "--trainer.max_steps=5",
               "--trainer.val_check_interval=100", "--trainer.limit_val_batches=0")
    assert cli.trainer.global_step == 5 and cli.model.iteration == 3


def test_each_update_changes_only_its_own_parameters(gan_run):
    m = gan_run[0].model
    own = {"generator": G_PARAMS, "critic": C_PARAMS}
    for u in m.updates:
        assert u["trainable_in_loss"] == own[u["name"]], u  # toggled: the other net is frozen while the loss is built
        assert u["changed"] == own[u["name"]], u  # all of its own, none of the other net's (bitwise)
        assert u["grads_left"] == [], u           # zero_grad(set_to_none) on all optimizers
        assert u["requires_restored"], u          # untoggled
    assert torch.equal(m.frozen.weight, m.frozen_init) and not m.frozen.weight.requires_grad
    assert all(not p.requires_grad for p in m.frozen.parameters())


def test_clip_norm_bounds_the_update(shapes_shards, tmp_path):
    """SGD(lr=1) with clip_norm=1e-3: every parameter update has norm <= 1e-3 although the gradients are larger."""
    sgd = "{class_path: torch.optim.SGD, init_args: {lr: 1.0}}"
    cli = _fit(shapes_shards, tmp_path, "--model.class_path=tests.common.test_manual.RecordingGAN",
               f"--model.init_args.optimizers={{generator: {sgd}, critic: {sgd}}}", "--model.init_args.schedulers=null",
               "--model.init_args.clip_norm=1.0e-3", "--model.init_args.max_iterations=2", "--trainer.limit_val_batches=0")
    updates = cli.model.updates
    assert [u["name"] for u in updates] == ["generator", "critic", "critic"]
    assert all(0 < u["delta"] <= 1e-3 * (1 + 1e-4) for u in updates), [u["delta"] for u in updates]
    assert max(u["delta"] for u in updates) > 0.9e-3  # clipped to the bound, not vanishing
    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        norms = [float(r[k]) for r in csv.DictReader(f) for k in ("train/critic/grad_norm",) if r.get(k)]
    assert norms and min(norms) > 1e-3  # the logged norm is the pre-clip norm


def test_checkpoint_holds_both_optimizers_schedulers_and_iteration(gan_run):
    root = gan_run[1]
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["ctrlgen_iteration"] == 4 and ckpt["global_step"] == 6
    assert len(ckpt["optimizer_states"]) == 2 and all(s["state"] for s in ckpt["optimizer_states"])
    assert [s["param_groups"][0]["lr"] for s in ckpt["optimizer_states"]] == pytest.approx(
        [2e-3 * 0.28, 1e-3 * 0.25])
    assert [s["last_epoch"] for s in ckpt["lr_schedulers"]] == [2, 4]
    assert "ctrlgen_generator_state" in ckpt  # the base's per-rank generator state still travels


# ------------------------------------------------------------------------------------------------------ resume
def test_resume_reproduces_uninterrupted_run(shapes_shards, tmp_path):
    """6 iterations straight == 3 + resume from last.ckpt + 3 (TTUR phase, RNG streams, data position, schedulers)."""
    common = ("--trainer.val_check_interval=1",)
    straight = _fit(shapes_shards, tmp_path / "a", "--model.init_args.max_iterations=6", *common)
    half = _fit(shapes_shards, tmp_path / "b", "--model.init_args.max_iterations=3", *common)
    assert half.model.iteration == 3 and (tmp_path / "b" / "checkpoints" / "last.ckpt").exists()
    resumed = _fit(shapes_shards, tmp_path / "b", "--model.init_args.max_iterations=6", "--ckpt_path=last", *common)
    assert resumed.model.iteration == straight.model.iteration == 6
    assert resumed.trainer.global_step == straight.trainer.global_step == 9  # G at 0, 2, 4 + C at 0..5
    sa, sb = straight.model.state_dict(), resumed.model.state_dict()
    assert_same_state(sa, sb)
    assert torch.equal(torch.cat(straight.model.seen_noise[3:]), torch.cat(resumed.model.seen_noise))
    assert straight.model.seen_levels[3:] == resumed.model.seen_levels
    assert straight.model.seen_keys[3:] == resumed.model.seen_keys
    for name in ("generator", "critic"):
        assert resumed.model.scheduler(name).last_epoch == straight.model.scheduler(name).last_epoch
        sa_opt = straight.model.optimizer(name).state_dict()["state"]
        sb_opt = resumed.model.optimizer(name).state_dict()["state"]
        for i in sa_opt:
            assert torch.allclose(sa_opt[i]["exp_avg_sq"], sb_opt[i]["exp_avg_sq"], atol=1e-9, rtol=0)
    assert not torch.allclose(half.model.state_dict()["critic.0.weight"], sb["critic.0.weight"])


def test_resume_from_file_takes_max_iterations_from_the_cli(gan_run, shapes_shards, tmp_path):
    """A checkpoint file re-applies its saved hyper-parameters, except runtime_args: max_iterations comes from the CLI."""
    ckpt = gan_run[1] / "checkpoints" / "last.ckpt"
    more = _fit(shapes_shards, tmp_path / "more", "--model.class_path=tests.common.test_manual.RecordingGAN",
                "--model.init_args.max_iterations=5", f"--ckpt_path={ckpt}")
    assert more.model.iteration == 5 and [(u["iteration"], u["name"]) for u in more.model.updates] == [
        (4, "generator"), (4, "critic")]
    assert more.trainer.global_step == 8
    done = _fit(shapes_shards, tmp_path / "done", "--model.class_path=tests.common.test_manual.RecordingGAN",
                f"--ckpt_path={ckpt}")  # max_iterations 4 already reached: no further iteration
    assert done.model.iteration == 4 and done.model.updates == [] and done.trainer.global_step == 6


# ------------------------------------------------------------------------------------------------------ errors
class _Overlap(TinyGANModule):
    def optimizer_params(self):
        return {"generator": list(self.generator.parameters()) + [self.critic[0].weight], "critic": self.critic}


class _Orphan(TinyGANModule):
    def optimizer_params(self):
        return {"generator": self.generator, "critic": self.critic[:3]}  # the critic's 2nd conv and head in none


def test_parameter_in_two_optimizers_fails():
    with pytest.raises(ValueError, match=r"claimed more than once.*critic\.0\.weight -> \['generator', 'critic'\]"):
        _Overlap().configure_optimizers()


def test_trainable_parameter_in_no_optimizer_fails():
    with pytest.raises(ValueError, match=r"in no optimizer \(optimizers \['generator', 'critic'\]\): "
                                         r"critic\.3\.weight, critic\.3\.bias, critic\.6\.weight, critic\.6\.bias; freeze them"):
        _Orphan().configure_optimizers()


def test_frozen_parameters_are_not_orphans_and_never_reach_optimizers():
    m = TinyGANModule()
    m.critic[6].requires_grad_(False)
    m.optimizer_params = lambda: {"generator": m.generator, "critic": [{"params": m.critic.parameters()}]}
    _, c = m.configure_optimizers()
    assert {id(p) for p in c.param_groups[0]["params"]} == {id(p) for p in m.critic[:6].parameters()}
    m.critic.requires_grad_(False)
    with pytest.raises(ValueError, match="optimizer 'critic' gets no trainable"):
        m.configure_optimizers()


def test_config_names_must_match_declared_optimizers():
    with pytest.raises(ValueError, match=r"schedulers names \['gen'\] are not optimizers.*\['generator', 'critic'\]"):
        TinyGANModule(schedulers={"gen": torch.optim.lr_scheduler.ConstantLR}).configure_optimizers()
    with pytest.raises(ValueError, match=r"no entry in `optimizers` for \['critic'\]"):
        TinyGANModule(optimizers={"generator": torch.optim.SGD}).configure_optimizers()
    with pytest.raises(ValueError, match="update_every must be >= 1"):
        TinyGANModule(update_every={"generator": 0})


def test_gradient_accumulation_refused_at_fit_start(shapes_shards, tmp_path):
    with pytest.raises(MisconfigurationException, match="gradient accumulation is not supported for manual optim"):
        _fit(shapes_shards, tmp_path, "--trainer.accumulate_grad_batches=2")
    assert not (tmp_path / "checkpoints").exists()
    with pytest.raises(MisconfigurationException, match="set model.init_args.accumulate_grad_batches: 2"):
        _fit(shapes_shards, tmp_path, "--trainer.accumulate_grad_batches=2")  # the message names the module's knob


def test_own_accumulation_guard():
    """Our own check (behind Lightning's, so a Lightning upgrade cannot silently ignore accumulate_grad_batches)."""
    import lightning as L

    m = TinyGANModule()
    m.trainer = L.Trainer(accumulate_grad_batches=3, logger=False, enable_checkpointing=False, accelerator="cpu")
    with pytest.raises(ValueError, match="accumulate_grad_batches=3 is not supported with manual optimisation"):
        m.setup("fit")


def test_ddp_without_find_unused_parameters_refused(tmp_path):
    """Read from the DDP wrapper (public ``find_unused_parameters``) at fit start, before the first iteration."""
    from lightning.pytorch.strategies import DDPStrategy

    with pytest.raises(ValueError, match="needs find_unused_parameters=True"):
        _exact_fit(tmp_path / "a", iterations=1, strategy=DDPStrategy(find_unused_parameters=False))
    m, trainer = _exact_fit(tmp_path / "b", iterations=1, strategy=DDPStrategy(find_unused_parameters=True))
    assert m.iteration == 1 and trainer.global_step == 2


# ------------------------------------------------------------------------------------------------------ random streams
def test_iteration_generator_is_rank_independent_and_changes_per_iteration(monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "1234")
    a, b = ManualOptimModule(), ManualOptimModule()
    a.iteration = b.iteration = 7
    assert torch.equal(torch.rand(4, generator=a.iteration_generator()), torch.rand(4, generator=b.iteration_generator()))
    assert not torch.equal(torch.rand(4, generator=a.iteration_generator()),
                           torch.rand(4, generator=a.iteration_generator(salt=1)))
    b.iteration = 8
    assert not torch.equal(torch.rand(4, generator=a.iteration_generator()),
                           torch.rand(4, generator=b.iteration_generator()))
    first = torch.rand(4, generator=b.iteration_generator())
    monkeypatch.setenv("PL_GLOBAL_SEED", "1235")  # another run seed -> another stream
    assert not torch.equal(first, torch.rand(4, generator=b.iteration_generator()))


# ------------------------------------------------------------------------------------------------------ accumulation
def _exact_fit(root, iterations: int, batch_size: int = 8, k: int = 1, n: int = 16, val_every: int | None = None,
               callbacks=(), ckpt_path=None, strategy="auto", module=None, **kwargs: Any):
    """``ExactGANModule`` fitted for ``iterations`` iterations on ``n`` fixed samples (no shuffling), generator every
    2nd iteration, Adam + clipped SGD with a schedule; validation every ``val_every`` iterations (else none)."""
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader

    opts = {"generator": lambda p: torch.optim.Adam(p, lr=1e-2),
            "critic": lambda p: torch.optim.SGD(p, lr=5e-2, momentum=0.9)}
    step_lr = {"critic": lambda o: torch.optim.lr_scheduler.StepLR(o, 2)}
    m = module or ExactGANModule(optimizers=opts, schedulers=step_lr,
                                 update_every={"generator": 2}, clip_norm={"critic": 0.05}, max_iterations=iterations,
                                 accumulate_grad_batches=k, **kwargs)
    val = ({"val_check_interval": val_every * k, "check_val_every_n_epoch": None, "limit_val_batches": 1} if val_every
           else {"limit_val_batches": 0})
    trainer = L.Trainer(accelerator="cpu", devices=1, strategy=strategy, max_steps=-1, max_epochs=100,
                        logger=CSVLogger(root, name="csv"), log_every_n_steps=1, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=bool(callbacks) or ckpt_path is not None,
                        default_root_dir=root, callbacks=list(callbacks), num_sanity_val_steps=0, **val)
    data = exact_gan_data(n)
    loader = DataLoader(data, batch_size=batch_size, shuffle=False)
    trainer.fit(m, train_dataloaders=loader,
                val_dataloaders=DataLoader(data[:4], batch_size=4) if val_every else None, ckpt_path=ckpt_path)
    return m, trainer


def _update_rows(root) -> list[dict[str, str]]:
    with open(next(root.rglob("metrics.csv"))) as f:
        return [r for r in csv.DictReader(f) if r.get("train/critic/loss")]


def test_two_half_batches_accumulated_equal_one_full_batch(tmp_path):
    """2 × 4 samples with accumulate_grad_batches=2 == 1 × 8 samples: the same weights after 4 iterations (float64,
    TTUR, Adam, clipped SGD with momentum and a schedule), the same optimizer steps, the same logged mean losses."""
    full, t_full = _exact_fit(tmp_path / "full", iterations=4, batch_size=8)
    acc, t_acc = _exact_fit(tmp_path / "acc", iterations=4, batch_size=4, k=2)
    assert acc.iteration == full.iteration == 4 and acc.micro_batch == 0
    assert t_acc.global_step == t_full.global_step == 6  # G at 0, 2 + C at 0..3: steps on the 2nd micro-batch only
    assert len(acc.generator_after_step) == len(full.generator_after_step) == 2
    assert_same_state(full.state_dict(), acc.state_dict(), atol=1e-12)
    assert acc.scheduler("critic").last_epoch == full.scheduler("critic").last_epoch == 4
    for name in ("generator", "critic"):
        sf, sa = full.optimizer(name).state_dict()["state"], acc.optimizer(name).state_dict()["state"]
        for i in sf:
            for key, v in sf[i].items():
                assert torch.allclose(v, sa[i][key], atol=1e-12, rtol=0), (name, i, key)
    rows_full, rows_acc = _update_rows(tmp_path / "full"), _update_rows(tmp_path / "acc")
    assert [r["step"] for r in rows_full] == ["0", "1", "2", "3"]  # the logger's x-axis counts batches
    assert [r["step"] for r in rows_acc] == ["1", "3", "5", "7"]   # logged on each iteration's last micro-batch
    for key in ("train/critic/loss", "train/critic/grad_norm", "train/generator/loss"):
        f = [float(r[key]) for r in rows_full if r.get(key)]
        a = [float(r[key]) for r in rows_acc if r.get(key)]
        assert len(f) == len(a) == (2 if "generator" in key else 4) and a == pytest.approx(f, rel=1e-10), key
    assert min(float(r["train/critic/grad_norm"]) for r in rows_full) > 0.05  # the clip was active
    # the comparison can fail: stepping on every half batch (no accumulation) gives other weights
    plain, _ = _exact_fit(tmp_path / "plain", iterations=8, batch_size=4)
    assert not torch.allclose(plain.generator[0].weight, full.generator[0].weight, atol=1e-6)


def test_accumulation_steps_only_on_the_last_micro_batch(tmp_path):
    """Within an iteration of k=3: turns and the rank-identical generator agree across micro-batches, gradients
    accumulate (no step, no zero_grad) until the 3rd, which steps each optimizer once and leaves no gradient."""
    seen: list[dict[str, Any]] = []

    class Probe(ExactGANModule):
        def train_iteration(self, batch, batch_idx):
            super().train_iteration(batch, batch_idx)
            seen.append({"it": self.iteration, "micro": self.micro_batch, "g_turn": self.is_turn("generator"),
                         "draw": torch.rand(1, generator=self.iteration_generator()).item(),
                         "grads": sorted({n.split(".")[0] for n, p in self.named_parameters() if p.grad is not None})})

    m, trainer = _exact_fit(tmp_path, iterations=2, batch_size=2, k=3, n=6, module=Probe(
        update_every={"generator": 2}, max_iterations=2, accumulate_grad_batches=3))
    assert [(s["it"], s["micro"]) for s in seen] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert [s["g_turn"] for s in seen] == [True] * 3 + [False] * 3
    assert seen[0]["draw"] == seen[1]["draw"] == seen[2]["draw"] != seen[3]["draw"]
    assert [s["grads"] for s in seen] == [["critic", "generator"]] * 2 + [[]] + [["critic"]] * 2 + [[]]
    assert m.iteration == 2 and trainer.global_step == 3 and len(m.generator_after_step) == 1


@pytest.mark.parametrize("k", [1, 2])
def test_max_iterations_and_validation_interval_count_iterations(tmp_path, k):
    """Two optimizers, max_iterations=5, validation every 2 iterations (val_check_interval = 2 × k batches): exactly 5
    iterations (5 × k batches), validation after iterations 2 and 4 and once more at the stop (Lightning validates
    when should_stop is set); global_step counts optimizer steps (G at 0, 2, 4 + C at 0..4)."""
    m, trainer = _exact_fit(tmp_path, iterations=5, batch_size=8 // k, k=k, n=40, val_every=2)
    assert m.iteration == 5 and trainer.global_step == 3 + 5
    assert trainer.fit_loop.total_batch_idx + 1 == 5 * k
    assert [it for it, _ in m.validated] == [2, 4, 5]


def test_accumulation_refuses_epochs_and_val_intervals_it_would_straddle(tmp_path):
    import lightning as L
    from torch.utils.data import DataLoader

    with pytest.raises(ValueError, match=r"an epoch of 3 training batches is not a multiple of model.init_args."
                                         r"accumulate_grad_batches=2.*limit_train_batches"):
        _exact_fit(tmp_path / "a", iterations=2, batch_size=4, k=2, n=12)
    data = exact_gan_data(16)
    trainer = L.Trainer(accelerator="cpu", max_steps=-1, max_epochs=1, logger=False, enable_checkpointing=False,
                        val_check_interval=3, check_val_every_n_epoch=None, enable_progress_bar=False,
                        num_sanity_val_steps=0)
    with pytest.raises(ValueError, match=r"trainer.val_check_interval of 3 training batches is not a multiple"):
        trainer.fit(ExactGANModule(max_iterations=2, accumulate_grad_batches=2), DataLoader(data, batch_size=2),
                    DataLoader(data[:2], batch_size=2))
    with pytest.raises(ValueError, match="accumulate_grad_batches must be an integer >= 1"):
        ExactGANModule(accumulate_grad_batches=0)


def test_accumulation_blocks_ddp_gradient_sync_on_early_micro_batches(tmp_path):
    """Under DDP (1 process, gloo) the first k-1 micro-batches' backward runs in strategy.block_backward_sync()
    (DDP no_sync: require_backward_grad_sync False), the k-th syncs."""
    from lightning.pytorch.strategies import DDPStrategy

    synced: list[tuple[int, bool]] = []

    class Probe(ExactGANModule):
        def manual_backward(self, loss, *args, **kwargs):
            synced.append((self.micro_batch, self.trainer.strategy.model.require_backward_grad_sync))
            return super().manual_backward(loss, *args, **kwargs)

    m, _ = _exact_fit(tmp_path, iterations=2, batch_size=4, k=2, strategy=DDPStrategy(
        find_unused_parameters=True, process_group_backend="gloo"), module=Probe(
        update_every={"generator": 2}, max_iterations=2, accumulate_grad_batches=2))
    # iteration 0: G and C on both micro-batches; iteration 1: C only
    assert synced == [(0, False), (0, False), (1, True), (1, True), (0, False), (1, True)]
    assert m.iteration == 2


def test_resume_with_accumulation_and_ema_reproduces_uninterrupted_run(shapes_shards, tmp_path):
    """accumulate_grad_batches=2 + EMA of the generator: 6 iterations straight == 3 + resume from last.ckpt + 3, for
    the weights, the average (its update count too) and the optimizer states; the stop falls mid-epoch."""
    from ctrlgen.callbacks import EMA

    common = ("--model.init_args.accumulate_grad_batches=2", "--trainer.val_check_interval=2",
              "--trainer.callbacks+=ctrlgen.callbacks.EMA", "--trainer.callbacks.optimizer=generator",
              "--trainer.callbacks.targets=[generator]", "--trainer.callbacks.decay=0.9",
              "--trainer.callbacks.use_ema_for_eval=true")
    straight = _fit(shapes_shards, tmp_path / "a", "--model.init_args.max_iterations=6", *common)
    half = _fit(shapes_shards, tmp_path / "b", "--model.init_args.max_iterations=3", *common)
    resumed = _fit(shapes_shards, tmp_path / "b", "--model.init_args.max_iterations=6", "--ckpt_path=last", *common)
    assert half.model.iteration == 3 and resumed.model.iteration == straight.model.iteration == 6
    assert half.trainer.fit_loop.total_batch_idx + 1 == 6
    assert resumed.trainer.global_step == straight.trainer.global_step == 9  # G at 0, 2, 4 + C at 0..5
    assert_same_state(straight.model.state_dict(), resumed.model.state_dict())
    ema_a, ema_b, ema_h = (next(c for c in cli.trainer.callbacks if isinstance(c, EMA)) for cli in (straight, resumed,
                                                                                                     half))
    assert ema_a.num_updates == ema_b.num_updates == 3 and ema_h.num_updates == 2
    assert set(ema_a.shadow) == {f"generator.{n}" for n, _ in straight.model.generator.named_parameters()}
    assert_same_state(ema_a.shadow, ema_b.shadow)
    assert not torch.allclose(ema_a.shadow["generator.0.weight"], straight.model.generator[0].weight, atol=1e-6)
    for name in ("generator", "critic"):
        sa_opt = straight.model.optimizer(name).state_dict()["state"]
        sb_opt = resumed.model.optimizer(name).state_dict()["state"]
        for i in sa_opt:
            assert torch.allclose(sa_opt[i]["exp_avg_sq"], sb_opt[i]["exp_avg_sq"], atol=1e-9, rtol=0)
    assert straight.model.seen_levels[6:] == resumed.model.seen_levels  # 2 micro-batches per iteration
