"""configs/strategy/*.yaml parse and instantiate through the CLI (CPU).

DDP builds a real Trainer (2 CPU devices, gloo) and trains 2 ranks in the slurm tier (slurm/train.sbatch stacks
configs/strategy/ddp.yaml by default). Lightning 2.6.6 refuses FSDP without a GPU at Trainer init ("The strategy `fsdp`
requires a GPU accelerator"), so for FSDP the strategy object the CLI instantiates is checked here and the training
run lives in bench/gpu_fsdp_check.sh.
"""

from __future__ import annotations

from datetime import timedelta

import pytest

from ctrlgen.lightning_modules.cli import CtrlgenCLI

BLOCK = "ctrlgen.lightning_modules.ecm.layers.AdaLNSelfAttn"


class _NoTrainerCLI(CtrlgenCLI):
    def instantiate_trainer(self, **kwargs):  # keep the instantiated config, skip Trainer's accelerator checks
        return None


def _cli(strategy_cfg: str, shards: dict[str, str], tmp_path, cls=CtrlgenCLI, *extra: str):
    return cls(args=["-c", "tests/configs/tiny.yaml", "-c", strategy_cfg,
                     f"--data.init_args.train_shards={shards['train']}", f"--trainer.default_root_dir={tmp_path}",
                     *extra], run=False)


def test_ddp_config(shapes_shards, tmp_path):
    from lightning.pytorch.strategies import DDPStrategy

    cli = _cli("configs/strategy/ddp.yaml", shapes_shards, tmp_path, CtrlgenCLI, "--trainer.accelerator=cpu",
               "--trainer.devices=2")
    s = cli.trainer.strategy
    assert isinstance(s, DDPStrategy) and cli.trainer.num_devices == 2
    # jsonargparse also passes torch DDP's own signature defaults explicitly (same behaviour); ours on top
    want = {"find_unused_parameters": False, "static_graph": True, "gradient_as_bucket_view": True}
    assert {k: s._ddp_kwargs.get(k) for k in want} == want
    assert s._timeout == timedelta(minutes=10)
    assert s.process_group_backend is None  # chosen at setup: gloo on CPU, nccl on GPU


@pytest.mark.parametrize("name,sharding", [("fsdp", "FULL_SHARD"), ("fsdp_hybrid", "HYBRID_SHARD")])
def test_fsdp_configs(shapes_shards, tmp_path, name, sharding):
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from ctrlgen.lightning_modules.ecm.layers import AdaLNSelfAttn

    cli = _cli(f"configs/strategy/{name}.yaml", shapes_shards, tmp_path, _NoTrainerCLI)
    cfg = cli.config_init.trainer
    s = cfg.strategy
    assert isinstance(s, FSDPStrategy) and cfg.precision == "bf16-mixed"
    assert s.sharding_strategy == getattr(ShardingStrategy, sharding)
    policy = s.kwargs["auto_wrap_policy"]
    assert isinstance(policy, ModuleWrapPolicy) and policy._module_classes == {AdaLNSelfAttn}
    assert s._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes == {AdaLNSelfAttn}
    assert s._state_dict_type == "full" and s._timeout == timedelta(minutes=10)
    assert s.kwargs.get("use_orig_params") is True  # Lightning's default: frozen + trainable params in one unit


def test_fsdp_on_cpu_is_refused_by_lightning(shapes_shards, tmp_path):
    with pytest.raises(ValueError, match="requires a GPU accelerator"):
        _cli("configs/strategy/fsdp.yaml", shapes_shards, tmp_path, CtrlgenCLI, "--trainer.accelerator=cpu",
             "--trainer.devices=2", "--trainer.precision=32-true")
