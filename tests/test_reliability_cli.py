"""What a user meets at the command line when something is wrong (issue 18): ``--ckpt_path last`` past a truncated
``last.ckpt`` or with nothing to resume, a second ``fit`` into a used run folder, unknown options, one-line errors
without a traceback (``CTRLGEN_DEBUG=1`` keeps it), ``data pack`` flags end to end, an unwritable W&B folder, and a
help that needs no torch. Each test asserts the message text and that no data was lost."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from ctrlgen.callbacks.checkpoint import read_step
from ctrlgen.lightning_modules import cli
from tests.conftest import REPO, cli_env, ctrlgen_cmd


def _args(shards, root, steps, *extra, val=False):
    out = ["fit", "-c", "tests/configs/tiny.yaml", f"--data.init_args.train_shards={shards['train']}",
           f"--trainer.max_steps={steps}", "--data.init_args.num_workers=0", f"--trainer.default_root_dir={root}"]
    if val:
        out += [f"--data.init_args.val_shards={shards['val']}", "--trainer.val_check_interval=2",
                "--trainer.limit_val_batches=1"]
    else:
        out += ["--trainer.limit_val_batches=0"]
    return out + list(extra)


def _exit_code(argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    return e.value.code, capsys.readouterr().err


def test_ckpt_path_last_falls_back_past_a_truncated_last_ckpt(shapes_shards, tmp_path, recwarn):
    cli.CtrlgenCLI(args=_args(shapes_shards, tmp_path, 4, val=True))
    ckdir = tmp_path / "checkpoints"
    step = sorted(ckdir.glob("step*.ckpt"))
    assert len(step) == 1 and read_step(ckdir / "last.ckpt") == 4
    good_step = read_step(step[0])
    data = (ckdir / "last.ckpt").read_bytes()
    (ckdir / "last.ckpt").write_bytes(data[: len(data) // 2])  # a kill mid-save of an older, non-atomic writer
    resumed = cli.CtrlgenCLI(args=_args(shapes_shards, tmp_path, good_step + 1, "--ckpt_path=last", val=True))
    assert resumed.trainer.ckpt_path == str(step[0])  # the step checkpoint, not a fresh start
    assert resumed.trainer.global_step == good_step + 1
    msgs = [str(w.message) for w in recwarn]
    assert any(f"{ckdir / 'last.ckpt'} is not a complete checkpoint; resuming from {step[0]} (step {good_step})" in m
               for m in msgs), msgs
    assert read_step(step[0]) == good_step  # the intact checkpoint it resumed from is still there


def test_ckpt_path_last_with_nothing_to_resume_warns_or_fails(shapes_shards, tmp_path, capsys):
    code, err = _exit_code(_args(shapes_shards, tmp_path / "a", 1, "--ckpt_path=last", "--require_ckpt"), capsys)
    assert code == 1 and "Traceback" not in err
    assert f"ctrlgen: error: --ckpt_path last --require_ckpt: no intact checkpoint (*.ckpt) in {tmp_path / 'a'}" in err
    assert not (tmp_path / "a" / "checkpoints").exists()  # nothing ran
    fresh = cli.CtrlgenCLI(args=_args(shapes_shards, tmp_path / "b", 1, "--ckpt_path=last"))
    err = capsys.readouterr().err
    assert (f"ctrlgen: WARNING: --ckpt_path last: no intact checkpoint in {tmp_path / 'b' / 'checkpoints'}; "
            f"training starts from scratch. Pass --require_ckpt to fail instead") in err
    assert fresh.trainer.ckpt_path is None and fresh.trainer.global_step == 1
    code, err = _exit_code(_args(shapes_shards, tmp_path / "c", 1, "--ckpt_path", str(tmp_path / "no.ckpt")), capsys)
    assert code == 1 and f"--ckpt_path {tmp_path / 'no.ckpt'}: no such file" in err


def test_second_fit_into_a_used_run_folder_is_refused_unless_overwrite(shapes_shards, tmp_path, capsys):
    cli.main(_args(shapes_shards, tmp_path, 2))
    last = tmp_path / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    code, err = _exit_code(_args(shapes_shards, tmp_path, 3), capsys)
    assert code == 2 and "Traceback" not in err
    assert f"ctrlgen: error: run folder {tmp_path} already holds a run (checkpoints/last.ckpt)" in err
    assert "--ckpt_path last" in err and "--overwrite" in err
    assert last.read_bytes() == before  # run 1 untouched
    cli.main(_args(shapes_shards, tmp_path, 3, "--overwrite"))
    err = capsys.readouterr().err
    assert f"--overwrite: removed 1 checkpoint(s) of the earlier run in {tmp_path / 'checkpoints'}" in err
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.ckpt"]  # no last-v1.ckpt
    assert read_step(last) == 3
    cli.main(_args(shapes_shards, tmp_path, 4, "--ckpt_path=last"))  # resuming is allowed
    assert read_step(last) == 4


def test_unknown_option_and_init_args_key_suggest_the_nearest(shapes_shards, tmp_path, capsys):
    code, err = _exit_code(_args(shapes_shards, tmp_path, 1, "--trainer.max_stepz=3"), capsys)
    assert code == 2
    assert "ctrlgen fit: error: unknown option --trainer.max_stepz; did you mean '--trainer.max_steps'?" in err
    code, err = _exit_code(_args(shapes_shards, tmp_path, 1, "--model.init_args.widht=3"), capsys)
    assert code == 2
    assert ("ctrlgen fit: error: model: tests.helpers.tiny_module.TinyAEModule has no argument 'widht'; did you mean "
            "'width'?") in err
    assert "BaseGenModule" not in err and "Given value" not in err
    typo = tmp_path / "typo.yaml"
    typo.write_text("model:\n  init_arg:\n    width: 3\n")
    code, err = _exit_code(_args(shapes_shards, tmp_path, 1, "-c", str(typo)), capsys)
    assert code == 2 and "'init_arg' is no key of a class entry (class_path tests.helpers.tiny_module." in err
    assert "did you mean 'init_args'?" in err
    code, err = _exit_code(["fitt"], capsys)
    assert code == 2 and "unknown subcommand 'fitt'; did you mean 'fit'?" in err
    for sub in ("fit", "validate", "test", "predict", "data", "demo", "ctrlgen data tokenize ", "ctrlgen demo table"):
        assert sub in err, sub
    assert not (tmp_path / "checkpoints").exists()


def _sub(args, **env):
    return subprocess.run(ctrlgen_cmd() + args, cwd=REPO, env={**cli_env(), **env}, capture_output=True, text=True,
                          timeout=300, check=False)


def test_data_error_is_one_line_without_traceback_unless_debug(tmp_path):
    args = ["fit", "-c", "tests/configs/tiny.yaml", f"--data.init_args.train_shards={tmp_path}/none-{{0..3}}.tar",
            f"--trainer.default_root_dir={tmp_path / 'run'}"]
    r = _sub(args)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"ctrlgen: error: data.train_shards: no shards found for pattern '{tmp_path}/none-" in r.stderr
    assert "CTRLGEN_DEBUG=1 shows the traceback" in r.stderr
    r = _sub(args, CTRLGEN_DEBUG="1")
    assert r.returncode == 1 and "Traceback (most recent call last)" in r.stderr
    assert "FileNotFoundError: data.train_shards: no shards found" in r.stderr
    r = _sub(["fit", "-c", str(tmp_path / "nosuch.yaml")])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"ctrlgen fit: error: Parser key \"config\": File does not exist: '{tmp_path / 'nosuch.yaml'}'" in r.stderr


def _png(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


def _members(pattern_dir):
    return sorted(m for t in sorted(pattern_dir.glob("*.tar")) for m in tarfile.open(t).getnames())


def test_pack_flags_end_to_end(tmp_path, capsys):
    src = tmp_path / "src"
    _png(src / "a.png", 10)
    _png(src / "sub" / "b.png", 200)
    out = tmp_path / "out"
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"a.png": 1}))
    r = _sub(["data", "pack", "--src", str(src), "--out", str(out / "train-%06d.tar"), "--labels", str(labels)])
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "ctrlgen: error: pack: 1 of 2 images have no entry in" in r.stderr and "sub/b.png" in r.stderr
    assert not out.exists() or not list(out.glob("*.tar"))  # nothing written
    base = ["data", "pack", "--src", str(src), "--out", str(out / "train-%06d.tar"), "--labels", str(labels)]
    cli.main([*base, "--allow-unlabelled", "--image-format", "png"])
    assert "packed 2 images (png) into 1 shards" in capsys.readouterr().out
    assert _members(out) == ["a.cls", "a.png", "sub__b.png"]
    with tarfile.open(out / "train-000000.tar") as t:
        pixels = np.asarray(Image.open(io.BytesIO(t.extractfile("sub__b.png").read())))
    assert (pixels == 200).all()  # lossless
    code, err = _exit_code([*base, "--allow-unlabelled"], capsys)
    assert code == 1 and "already match" in err and "Pass --overwrite to replace them" in err
    cli.main([*base, "--allow-unlabelled", "--overwrite"])
    assert "--overwrite: removed 1 earlier shard(s)" in capsys.readouterr().out
    assert _members(out) == ["a.cls", "a.jpg", "sub__b.jpg"]  # default jpg, the png shard replaced
    code, err = _exit_code(["data", "pack", "--src", str(src), "--out", str(out / "train.tar")], capsys)
    assert code == 1 and "needs one integer field for the shard number" in err
    _png(src / "sub__b.png", 0)  # the same key as sub/b.png
    code, err = _exit_code([*base, "--allow-unlabelled", "--overwrite"], capsys)
    assert code == 1 and "sub/b.png + sub__b.png -> 'sub__b'" in err
    assert _members(out) == ["a.cls", "a.jpg", "sub__b.jpg"]  # the refused packs left the shards alone


def test_wandb_fails_naming_an_unwritable_run_folder(shapes_shards, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    blocker = tmp_path / "file"
    blocker.write_text("")  # a folder below a file cannot be created
    code, err = _exit_code(["fit", "-c", "tests/configs/tiny.yaml", "-c", "configs/logger/wandb.yaml",
                            f"--data.init_args.train_shards={shapes_shards['train']}",
                            f"--trainer.default_root_dir={blocker / 'run'}"], capsys)
    assert code == 1 and f"ctrlgen: error: W&B: folder {blocker / 'run'} is not writable" in err
    assert "--trainer.default_root_dir=<a writable folder>" in err


HELP_PROBE = """
import sys
from ctrlgen.lightning_modules import cli
for argv in (["--help"], ["data", "--help"], ["demo", "--help"], ["data", "pack", "--help"], ["nosuch"]):
    try:
        cli.main(argv)
    except SystemExit:
        pass
heavy = sorted(m for m in ("torch", "lightning", "jsonargparse", "webdataset") if m in sys.modules)
print("HEAVY", heavy, file=sys.stderr)
"""


def test_help_and_tool_help_import_no_torch():
    r = subprocess.run([sys.executable, "-c", HELP_PROBE], cwd=REPO, env=cli_env(), capture_output=True, text=True,
                       timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    assert "HEAVY []" in r.stderr, r.stderr[-2000:]
    assert "ctrlgen data tokenize " in r.stderr and "--allow-unlabelled" in r.stdout
    for sub in cli.COMMANDS:
        assert f"  {sub} " in r.stdout, sub
