"""SLURM launch guard: refuse, with a clear message, job layouts that make Lightning hang or go wrong (platform.md §2).

Lightning treats a process as a SLURM rank whenever ``SLURM_NTASKS`` is set (unless the job is named ``bash`` or
``interactive``) and takes world size and ranks from Slurm, so

(a) a multi-task job whose training command is not started by ``srun`` (the batch script runs ``python`` itself) waits
    forever at ``Initializing distributed: GLOBAL_RANK: 0, MEMBER: 1/N`` for ranks that never come (#6626, #18650);
(b) ``--ntasks-per-node`` != ``trainer.devices`` or ``--nodes`` != ``trainer.num_nodes``: seen on the local Slurm
    (Lightning 2.6.6), ``devices=1`` in a 2-task job makes each rank train alone into the same run dir and exit 0;
    other mismatches fail only once fit starts, after the model is built. ``--ntasks`` without ``--ntasks-per-node``
    fails at Trainer init.
(c) outside SLURM: ``LOCAL_RANK`` set makes Lightning's launcher treat the process as a rank some other launcher
    started, so it starts no ranks itself. Lightning's own launcher writes ``LOCAL_RANK`` into the parent's
    environment and its teardown removes only ``WORLD_SIZE``; a later run started from that process (a notebook, a
    test worker, a wrapper script) inherits it and, without a ``WORLD_SIZE`` equal to ``devices x num_nodes``, would
    wait forever too.

This file imports only the standard library and nothing of the project (a leaf: the CLI imports it, never the reverse).
Ways in:

- ``check_trainer_config(cfg.trainer)`` / ``guard_or_exit(cfg.trainer)``: the ``ctrlgen`` entry point
  (``ctrlgen.lightning_modules.cli``) calls ``guard_or_exit(None)`` before parsing the config (check (a)) and
  ``CtrlgenCLI.before_instantiate_classes`` calls it on the parsed trainer settings (a) + (b), before any class is
  instantiated, so ``srun ctrlgen fit ...`` / ``srun python -m ctrlgen.lightning_modules.cli fit ...`` is guarded;
- ``python lightning_modules/common/slurm.py preflight`` (a path, not ``-m``: skips the package imports and answers in
  milliseconds): run by ``slurm/*.sbatch`` in the batch step before ``srun``
  (job geometry, ``srun``/``scontrol`` on PATH; ``scontrol`` is what Lightning's auto-requeue calls);
- ``python lightning_modules/common/slurm.py check [--devices N] [--num-nodes M]``: the same checks as the CLI on
  given trainer settings.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Mapping
from typing import Any

__all__ = [
    "SlurmLaunchError",
    "check_launch",
    "check_trainer_config",
    "guard_or_exit",
    "launch_problems",
    "main",
    "slurm_active",
    "started_by_srun",
]

# step ids Slurm gives to the non-srun steps (batch script, extern, interactive): they never run ranks
_SPECIAL_STEP_MIN = 0xFFFFFFF0
_SPECIAL_STEP_NAMES = {"batch", "extern", "interactive", "pending"}
DOCS = "see slurm/README.md and slurm/train.sbatch"


class SlurmLaunchError(RuntimeError):
    """The SLURM job layout cannot work with the trainer settings (the message says what to change)."""


def _env(env: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if env is None else env


def slurm_active(env: Mapping[str, str] | None = None) -> bool:
    """Lightning's ``SLURMEnvironment.detect()``: ``SLURM_NTASKS`` set and the job not named bash/interactive."""
    e = _env(env)
    return "SLURM_NTASKS" in e and e.get("SLURM_JOB_NAME") not in ("bash", "interactive")


def started_by_srun(env: Mapping[str, str] | None = None) -> bool:
    """True inside an ``srun`` job step: Slurm sets ``SLURM_STEP_ID`` there, but not in the batch script."""
    e = _env(env)
    step = e.get("SLURM_STEP_ID", e.get("SLURM_STEPID"))
    if step is None or step.strip().lower() in _SPECIAL_STEP_NAMES:
        return False
    try:
        return int(step) < _SPECIAL_STEP_MIN
    except ValueError:
        return False


def _int(e: Mapping[str, str], key: str) -> int | None:
    v = e.get(key)
    if v is None or v == "":
        return None
    try:
        return int(v.split("(")[0].split(",")[0])  # SLURM_TASKS_PER_NODE-style "2(x3)" → 2
    except ValueError:
        return None


def _device_count(devices: Any) -> int | None:
    """``trainer.devices`` → count per node, or None when it cannot be told from the config ("auto", -1, "-1")."""
    if devices is None or isinstance(devices, bool):
        return None
    if isinstance(devices, int):
        return devices if devices > 0 else None
    if isinstance(devices, (list, tuple)):
        return len(devices)
    s = str(devices).strip()
    if s in ("auto", "-1", ""):
        return None
    if "," in s:  # "0,1" = explicit device ids
        return len([x for x in s.split(",") if x.strip()])
    try:
        n = int(s)
    except ValueError:
        return None
    return n if n > 0 else None


def launch_problems(devices: Any = None, num_nodes: Any = None, env: Mapping[str, str] | None = None,
                    in_step: bool | None = None) -> list[str]:
    """What is wrong with this process as a rank of the SLURM job (empty list: fine, or not a SLURM job).

    ``in_step=None`` checks that a multi-task job runs this process under ``srun``; ``False`` skips that check (the
    batch-step preflight, which is about to call srun).
    """
    e = _env(env)
    if not slurm_active(e):
        return _inherited_rank_problems(devices, num_nodes, e)
    problems: list[str] = []
    ntasks = _int(e, "SLURM_NTASKS") or 1
    per_node = _int(e, "SLURM_NTASKS_PER_NODE")
    nnodes = _int(e, "SLURM_NNODES") or _int(e, "SLURM_JOB_NUM_NODES")
    if in_step is None and ntasks > 1 and not started_by_srun(e):
        problems.append(
            f"this SLURM job has {ntasks} tasks (SLURM_NTASKS={ntasks}) but the training command was not started by "
            "`srun` (SLURM_STEP_ID is unset: this is the batch script itself). Lightning takes its world size from "
            f"Slurm and would wait forever at 'Initializing distributed: GLOBAL_RANK: 0, MEMBER: 1/{ntasks}' for ranks "
            "that never start. Launch it as `srun python -m ctrlgen.lightning_modules.cli fit ...` (or `srun ctrlgen fit ...`)")
    if ntasks > 1 and per_node is None:
        problems.append(
            f"the job asks for --ntasks={ntasks} without --ntasks-per-node; Lightning needs the per-node count. "
            f"Submit with --nodes=N --ntasks-per-node=<GPUs per node> instead of --ntasks")
    n_dev = _device_count(devices)
    if per_node is not None and n_dev is not None and n_dev != per_node:
        problems.append(
            f"SLURM runs {per_node} task(s) per node (--ntasks-per-node={per_node}) but trainer.devices={devices}: "
            f"Lightning needs exactly one task per device. Pass --trainer.devices={per_node} (slurm/train.sbatch "
            f"passes $SLURM_NTASKS_PER_NODE) or submit with --ntasks-per-node={n_dev}")
    if num_nodes is not None and nnodes is not None:
        try:
            nn = int(num_nodes)
        except (TypeError, ValueError):
            nn = None
        if nn is not None and nn != nnodes:
            problems.append(
                f"the job has {nnodes} node(s) (--nodes={nnodes}) but trainer.num_nodes={num_nodes}. Pass "
                f"--trainer.num_nodes={nnodes} (slurm/train.sbatch passes $SLURM_NNODES) or submit with --nodes={nn}")
    return problems


def _inherited_rank_problems(devices: Any, num_nodes: Any, e: Mapping[str, str]) -> list[str]:
    """(c): ``LOCAL_RANK`` set, outside SLURM and torchelastic, with ``WORLD_SIZE`` unset or not ``devices x nodes``.

    Lightning's launcher leaves ``LOCAL_RANK``, ``NODE_RANK`` and ``MASTER_*`` behind (its teardown removes only
    ``WORLD_SIZE``); a hand launch of every rank sets ``WORLD_SIZE`` as Lightning's cluster docs require, and passes.
    """
    if "LOCAL_RANK" not in e or all(k in e for k in ("RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE")):
        return []  # no launcher variables, or torchrun's full set (torchrun starts every rank itself)
    n_dev, world = _device_count(devices), _int(e, "WORLD_SIZE")
    try:
        nodes = int(num_nodes) if num_nodes is not None else 1
    except (TypeError, ValueError):
        return []
    if n_dev is None or n_dev * nodes == (world or 1):
        return []
    seen = f"WORLD_SIZE={world}" if world is not None else "WORLD_SIZE unset"
    return [f"LOCAL_RANK={e['LOCAL_RANK']} is set in the environment ({seen}) and the trainer asks for devices={devices} "
            f"x num_nodes={nodes} = {n_dev * nodes} processes. With LOCAL_RANK set Lightning starts no ranks itself "
            f"and would wait forever at 'Initializing distributed: GLOBAL_RANK: 0, MEMBER: 1/{n_dev * nodes}'. "
            "Lightning's own launcher leaves LOCAL_RANK/NODE_RANK/MASTER_PORT in the process that ran an earlier fit "
            "(a notebook, a test worker, a wrapper script): unset them (`env -u LOCAL_RANK -u NODE_RANK ctrlgen fit "
            f"...`); if you start every rank yourself, set WORLD_SIZE={n_dev * nodes} as well"]


def _format(problems: list[str], env: Mapping[str, str]) -> str:
    job = env.get("SLURM_JOB_ID", "?")
    rank = env.get("SLURM_PROCID", "?")
    head = (f"ctrlgen SLURM launch guard: refusing to start (job {job}, SLURM_PROCID={rank}):" if slurm_active(env)
            else "ctrlgen launch guard: refusing to start:")
    return "\n".join([head, *(f"  - {p}" for p in problems), f"  ({DOCS})"])


def check_launch(devices: Any = None, num_nodes: Any = None, env: Mapping[str, str] | None = None,
                 in_step: bool | None = None) -> None:
    """Raise :class:`SlurmLaunchError` listing every problem of :func:`launch_problems`; no-op outside SLURM."""
    e = _env(env)
    problems = launch_problems(devices, num_nodes, e, in_step)
    if problems:
        raise SlurmLaunchError(_format(problems, e))


def _get(cfg: Any, key: str) -> Any:
    if cfg is None:
        return None
    if isinstance(cfg, Mapping):
        return cfg.get(key)
    return getattr(cfg, key, None)


def check_trainer_config(trainer_cfg: Any, env: Mapping[str, str] | None = None) -> None:
    """:func:`check_launch` with ``devices``/``num_nodes`` read from a parsed ``trainer`` config (Namespace or dict)."""
    check_launch(_get(trainer_cfg, "devices"), _get(trainer_cfg, "num_nodes"), env)


def guard_or_exit(trainer_cfg: Any = None, env: Mapping[str, str] | None = None) -> None:
    """:func:`check_trainer_config`, but print the message and exit 2 instead of raising (no traceback in job logs)."""
    try:
        check_trainer_config(trainer_cfg, env)
    except SlurmLaunchError as err:
        print(str(err), file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def preflight(env: Mapping[str, str] | None = None) -> list[str]:
    """Batch-step checks before ``srun``: job geometry and the Slurm commands the job relies on."""
    e = _env(env)
    problems = launch_problems(env=e, in_step=False)
    if "SLURM_JOB_ID" not in e:
        problems.append("not inside a SLURM job (SLURM_JOB_ID unset): submit with sbatch")
    if shutil.which("srun") is None:
        problems.append("`srun` is not on PATH in the job environment")
    if shutil.which("scontrol") is None:
        problems.append("`scontrol` is not on PATH in the job environment: Lightning's auto-requeue calls "
                        "`scontrol requeue $SLURM_JOB_ID` on SIGUSR1 and a time limit would end the run for good")
    ntasks, per_node = _int(e, "SLURM_NTASKS"), _int(e, "SLURM_NTASKS_PER_NODE")
    nnodes = _int(e, "SLURM_NNODES")
    if ntasks and per_node and nnodes and ntasks != per_node * nnodes:
        problems.append(f"SLURM_NTASKS={ntasks} != --nodes={nnodes} x --ntasks-per-node={per_node}: every node must "
                        "run the same number of ranks")
    return problems


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = argv[0] if argv else ""
    if cmd == "preflight":
        problems = preflight()
        if problems:
            print(_format(problems, os.environ), file=sys.stderr, flush=True)
            raise SystemExit(2)
        e = os.environ
        print(f"ctrlgen preflight ok: job {e.get('SLURM_JOB_ID')} nodes={e.get('SLURM_NNODES')} "
              f"ntasks-per-node={e.get('SLURM_NTASKS_PER_NODE')} cpus-per-task={e.get('SLURM_CPUS_PER_TASK')} "
              f"restart={e.get('SLURM_RESTART_COUNT', '0')}", flush=True)
        return None
    if cmd == "check":  # check [--devices N] [--num-nodes M]
        import argparse

        p = argparse.ArgumentParser(prog="python -m ctrlgen.lightning_modules.common.slurm check")
        p.add_argument("--devices")
        p.add_argument("--num-nodes")
        a = p.parse_args(argv[1:])
        guard_or_exit({"devices": a.devices, "num_nodes": a.num_nodes})
        return None
    print(f"lightning_modules/common/slurm.py: unknown command {cmd!r}; it runs `preflight` "
          "and `check [--devices N] [--num-nodes M]`. Training runs through the guarded entry point: "
          "`srun ctrlgen fit ...` or `srun python -m ctrlgen.lightning_modules.cli fit ...` "
          "(it runs these checks before and after parsing the config)", file=sys.stderr, flush=True)
    raise SystemExit(2)


if __name__ == "__main__":
    main()
