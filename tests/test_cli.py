"""The console entry point: help texts, tool subcommands, config parsing and the W&B offline switch."""

from __future__ import annotations

import subprocess

import pytest

from tests.conftest import REPO, cli_env, ctrlgen_cmd


def _run(args: list[str], timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(ctrlgen_cmd() + args, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=timeout)


def test_help_lists_subcommands_and_tools():
    r = _run(["--help"])
    assert r.returncode == 0, r.stderr
    for word in ("fit", "validate", "test", "predict"):
        assert word in r.stdout
    assert "ctrlgen data synth" in r.stderr and "ctrlgen demo ecm" in r.stderr
    from ctrlgen.lightning_modules import cli

    for tool in ("synth", "pack", "inspect", "refstats", "tokenize"):  # every data tool, from its own parser
        assert f"ctrlgen data {tool} " in r.stderr, tool
    assert "ctrlgen demo table" in r.stderr and "ctrlgen demo list" in r.stderr
    assert set(cli.COMMANDS) == {"fit", "validate", "test", "predict", "data", "demo"}


def test_unknown_tool_arguments_fail_with_usage():
    from ctrlgen.lightning_modules import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "no-such-method"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        cli.main(["data", "tokenize"])  # --shards, --out and --config are required
    assert e.value.code == 2


def test_fit_help_shows_base_arguments():
    r = _run(["fit", "--help"])
    assert r.returncode == 0, r.stderr
    assert "--model" in r.stdout and "--data" in r.stdout and "--trainer.max_steps" in r.stdout


def test_console_script_installed():
    import shutil

    if not (REPO / ".venv").is_dir():
        pytest.skip("no .venv here (run `make venv`)")
    exe = shutil.which("ctrlgen", path=str(REPO / ".venv" / "bin"))
    if exe is None:  # `make venv` installs [project.scripts]: a missing script is a broken entry point
        pytest.fail(f"ctrlgen console script missing from {REPO / '.venv' / 'bin'} although .venv exists "
                    "(check [project.scripts] in pyproject.toml and rerun `make venv`)")
    r = subprocess.run([exe, "fit", "--help"], capture_output=True, text=True, timeout=120, env=cli_env())
    assert r.returncode == 0 and "--trainer.max_steps" in r.stdout


def test_bad_class_path_fails_before_training(shapes_shards, tmp_path):
    r = _run(["fit", "-c", "tests/configs/tiny.yaml", "--model.class_path=tests.helpers.tiny_module.NoSuchModule",
              f"--trainer.default_root_dir={tmp_path}"])
    assert r.returncode != 0
    assert "NoSuchModule" in r.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_wandb_goes_offline_without_key(monkeypatch):
    from ctrlgen.lightning_modules import cli

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", "/nonexistent/netrc")
    assert cli.configure_wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert cli.configure_wandb_mode() == "disabled"  # an explicit mode always wins


def test_data_tools_synth_and_inspect(tmp_path):
    r = _run(["data", "synth", "--world", "shapes", "--out", str(tmp_path), "--n-train", "12", "--n-val", "4",
              "--n-test", "0", "--size", "32", "--shard-size", "6"])
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["train-000000.tar", "train-000001.tar", "val-000000.tar"]
    r = _run(["data", "inspect", str(tmp_path / "train-{000000..000001}.tar")])
    assert r.returncode == 0, r.stderr
    assert "12" in r.stdout and "canny.png" in r.stdout


def test_dispatch_table_names_every_lightning_subcommand():
    from ctrlgen.lightning_modules import cli

    assert set(cli.LIGHTNING_SUBCOMMANDS) == set(cli.CtrlgenCLI.subcommands()) == set(cli.SUBCOMMANDS)
    assert set(cli.LIGHTNING_SUBCOMMANDS) < set(cli.COMMANDS)
