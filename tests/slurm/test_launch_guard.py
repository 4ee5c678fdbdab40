"""The SLURM launch guard (lightning_modules/common/slurm.py) on fake Slurm environments: no cluster needed."""

from __future__ import annotations

import functools

import pytest
from jsonargparse import Namespace

from ctrlgen.lightning_modules.common import slurm as guard

BATCH_STEP = {"SLURM_JOB_ID": "42", "SLURM_JOB_NAME": "ctrlgen", "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2",
              "SLURM_NNODES": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}
SRUN_STEP = {**BATCH_STEP, "SLURM_STEP_ID": "0", "SLURM_STEPID": "0"}


def test_not_slurm_or_interactive_is_left_alone():
    assert guard.launch_problems(devices=8, num_nodes=4, env={}) == []
    assert guard.launch_problems(devices=1, env={**BATCH_STEP, "SLURM_JOB_NAME": "interactive"}) == []
    assert guard.launch_problems(devices=1, env={**BATCH_STEP, "SLURM_JOB_NAME": "bash"}) == []
    guard.check_launch(devices=3, env={})


def test_multi_task_without_srun_is_refused():
    with pytest.raises(guard.SlurmLaunchError, match="not started by `srun`") as e:
        guard.check_launch(devices=2, num_nodes=1, env=BATCH_STEP)
    assert "SLURM_NTASKS=2" in str(e.value) and "srun python -m ctrlgen.lightning_modules.cli fit" in str(e.value)
    for special in ("batch", "extern", str(0xFFFFFFFB)):  # non-srun step ids some Slurm versions export
        assert not guard.started_by_srun({**BATCH_STEP, "SLURM_STEP_ID": special})
    guard.check_launch(devices=2, num_nodes=1, env=SRUN_STEP)
    guard.check_launch(devices=1, num_nodes=1, env={**BATCH_STEP, "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1"})


@pytest.mark.parametrize("devices,ok", [(2, True), ("2", True), ([0, 1], True), ("0,1", True), ("auto", True),
                                        (-1, True), (1, False), ("4", False), ([0], False)])
def test_devices_must_equal_tasks_per_node(devices, ok):
    problems = guard.launch_problems(devices=devices, num_nodes=1, env=SRUN_STEP)
    assert (problems == []) == ok, problems
    if not ok:
        assert "--ntasks-per-node=2" in problems[0] and f"trainer.devices={devices}" in problems[0]


def test_nodes_must_equal_num_nodes_and_ntasks_needs_per_node():
    env = {**SRUN_STEP, "SLURM_NNODES": "2", "SLURM_NTASKS": "4"}
    (p,) = guard.launch_problems(devices=2, num_nodes=1, env=env)
    assert "--nodes=2" in p and "trainer.num_nodes=1" in p
    assert guard.launch_problems(devices=2, num_nodes=2, env=env) == []
    env = {k: v for k, v in SRUN_STEP.items() if k != "SLURM_NTASKS_PER_NODE"}
    (p,) = guard.launch_problems(devices=2, num_nodes=1, env=env)
    assert "without --ntasks-per-node" in p


def test_trainer_config_forms_and_exit(capsys):
    guard.check_trainer_config(Namespace(devices=2, num_nodes=1), env=SRUN_STEP)
    guard.check_trainer_config({"devices": "auto"}, env=SRUN_STEP)
    with pytest.raises(SystemExit) as e:
        guard.guard_or_exit(Namespace(devices=1, num_nodes=1), env=SRUN_STEP)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("ctrlgen SLURM launch guard: refusing to start (job 42, SLURM_PROCID=0)")
    assert "Traceback" not in err


def test_preflight(monkeypatch):
    monkeypatch.setattr(guard.shutil, "which", lambda name: f"/usr/bin/{name}")
    assert guard.preflight(BATCH_STEP) == []  # the batch step itself is fine: it is about to call srun
    assert any("SLURM_JOB_ID unset" in p for p in guard.preflight({}))
    assert any("!= --nodes=2 x --ntasks-per-node=2" in p
               for p in guard.preflight({**BATCH_STEP, "SLURM_NNODES": "2", "SLURM_NTASKS": "3"}))
    monkeypatch.setattr(guard.shutil, "which", lambda name: None if name == "scontrol" else f"/usr/bin/{name}")
    (p,) = guard.preflight(BATCH_STEP)
    assert "scontrol" in p and "requeue" in p


def test_guarded_entry_refuses_after_parsing_before_building(monkeypatch, shapes_shards, tmp_path, capsys):
    """``ctrlgen fit ...`` (``python -m ctrlgen.lightning_modules.cli``, the guarded entry): the parsed trainer.devices
    is checked before any model."""
    from ctrlgen.lightning_modules.cli import main as ctrlgen_main

    for k, v in SRUN_STEP.items():
        monkeypatch.setenv(k, v)
    built = []
    from tests.helpers.tiny_module import TinyAEModule

    orig = TinyAEModule.__init__

    @functools.wraps(orig)  # jsonargparse still sees the real signature
    def spy(self, *a, **k):
        built.append(1)
        orig(self, *a, **k)

    monkeypatch.setattr(TinyAEModule, "__init__", spy)
    with pytest.raises(SystemExit) as e:
        ctrlgen_main(["fit", "-c", "tests/configs/tiny.yaml",
                      f"--data.init_args.train_shards={shapes_shards['train']}", "--trainer.devices=1",
                      f"--trainer.default_root_dir={tmp_path}"])
    assert e.value.code == 2 and not built
    assert "trainer.devices=1" in capsys.readouterr().err
    monkeypatch.delenv("SLURM_STEP_ID")
    monkeypatch.delenv("SLURM_STEPID")
    with pytest.raises(SystemExit) as e:  # batch step: refused before the config is even parsed
        ctrlgen_main(["fit", "-c", "does-not-exist.yaml"])
    assert e.value.code == 2
    assert "not started by `srun`" in capsys.readouterr().err


def test_guard_script_runs_only_its_own_commands(monkeypatch, capsys):
    """``lightning_modules/common/slurm.py`` is a leaf: training commands are refused with the entry point to use."""
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    with pytest.raises(SystemExit) as e:
        guard.main(["fit", "-c", "tests/configs/tiny.yaml"])
    assert e.value.code == 2
    assert "srun python -m ctrlgen.lightning_modules.cli fit" in capsys.readouterr().err
    guard.main(["check", "--devices", "2"])  # outside SLURM: nothing to refuse


def test_launcher_variables_left_by_an_earlier_run_are_refused(capsys):
    """Lightning's launcher leaves LOCAL_RANK=0 (no WORLD_SIZE) in the environment of the process that ran a
    one-device DDP fit (seen under Lightning 2.6: a later two-device fit from a test worker spawned no rank 1 and hung
    in 'Initializing distributed'); a hand launch sets WORLD_SIZE and passes."""
    left = {"LOCAL_RANK": "0", "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "60611"}
    (p,) = guard.launch_problems(devices=2, num_nodes=1, env=left)
    assert "LOCAL_RANK=0 is set in the environment (WORLD_SIZE unset)" in p and "= 2 processes" in p
    assert "env -u LOCAL_RANK" in p and "WORLD_SIZE=2" in p
    (p,) = guard.launch_problems(devices=2, num_nodes=2, env={**left, "WORLD_SIZE": "2"})
    assert "(WORLD_SIZE=2)" in p and "= 4 processes" in p
    with pytest.raises(SystemExit) as e:
        guard.guard_or_exit(Namespace(devices=2, num_nodes=1), env=left)
    assert e.value.code == 2 and capsys.readouterr().err.startswith("ctrlgen launch guard: refusing to start:")
    assert guard.launch_problems(devices=2, num_nodes=1, env={**left, "LOCAL_RANK": "1", "WORLD_SIZE": "2"}) == []
    assert guard.launch_problems(devices=1, num_nodes=1, env=left) == []  # consistent: the run that left them
    assert guard.launch_problems(devices="auto", num_nodes=1, env=left) == []  # unknown count: not judged
    torchrun = {**left, "RANK": "0", "GROUP_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    assert guard.launch_problems(devices=2, num_nodes=1, env=torchrun) == []
