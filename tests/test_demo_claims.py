"""The demo contract (lightning_modules/apps/claims.py): claims written and read back from summary.json, one table
over several demos, and the exit code of ``ctrlgen demo table`` / ``make demo`` on met and unmet claims."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from ctrlgen.lightning_modules.apps import claims as C
from tests.conftest import REPO, cli_env


def _summary(tmp_path, name, claims, method=None):
    d = tmp_path / name
    C.write_summary(d, {"method": method or name, "results": {"x": 1.0}}, claims)
    return d


@pytest.mark.parametrize("value,target,met", [(0.06, "> 0.05", True), (0.05, "> 0.05", False), (0.05, ">= 0.05", True),
                                              (0.7, "< 1", True), (1.0, "< 1", False), (1.0, "<=1", True),
                                              (None, "< 1", False), (float("nan"), "> 0", False),
                                              (-2e-3, "> -1e-2", True)])
def test_claim_met_follows_target(value, target, met):
    c = C.claim("x", value, target)
    assert c.met is met and c.target == target


@pytest.mark.parametrize("target", ["0.05", "> ", "=> 1", "> one", "== 1"])
def test_bad_target_is_refused(target):
    with pytest.raises(ValueError, match="expected a comparison with a number"):
        C.claim("x", 1.0, target)


def test_write_read_round_trip_keeps_details(tmp_path):
    cl = [C.claim("canny_f1_margin", 0.12, "> 0.05"), C.claim("epoch_cost_ratio", 1.3, "< 1")]
    d = _summary(tmp_path, "ecm", cl)
    data = json.loads((d / "summary.json").read_text())
    assert data["results"] == {"x": 1.0} and data["method"] == "ecm"  # the detailed results stay next to the claims
    assert data["claims"][0] == {"name": "canny_f1_margin", "value": 0.12, "target": "> 0.05", "met": True}
    assert C.read_claims(d) == ("ecm", cl) == C.read_claims(d / "summary.json")
    assert [c.met for c in cl] == [True, False]


@pytest.mark.parametrize("content,expect", [
    (None, "no such file"), ("{not json", "not JSON"), ('{"results": {}}', "no 'claims' key"),
    ('{"claims": []}', "claims=[]"), ('{"claims": [{"name": "a", "value": 1}]}', "lacks ['target', 'met']"),
    ('{"claims": [{"name": "a", "value": "big", "target": "> 1", "met": true}]}', "is not a number"),
])
def test_unreadable_summaries_say_what_is_wrong(tmp_path, content, expect):
    d = tmp_path / "m"
    d.mkdir()
    if content is not None:
        (d / "summary.json").write_text(content)
    with pytest.raises(C.ClaimsError, match="summary.json") as e:
        C.read_claims(d)
    assert expect in str(e.value)


def test_table_of_all_methods_and_exit_code(tmp_path, capsys):
    good = _summary(tmp_path, "ecm", [C.claim("canny_f1_margin", 0.12, "> 0.05"),
                                      C.claim("epoch_cost_ratio", 0.4, "< 1")])
    bad = _summary(tmp_path, "other", [C.claim("speedup", 1.5, "> 2")])
    text, ok = C.claims_table([good])
    assert ok and "all 2 claims met" in text
    rows = [ln.split() for ln in text.splitlines()]
    assert rows[0] == ["method", "claim", "value", "target", "met"]
    assert ["ecm", "canny_f1_margin", "0.12", ">", "0.05", "yes"] in rows
    assert C.table_main([good]) == 0
    assert C.table_main([good, bad]) == 1
    out = capsys.readouterr().out
    assert ["other", "speedup", "1.5", ">", "2", "NO"] in [ln.split() for ln in out.splitlines()]
    assert "1 of 3 claims NOT met" in out
    missing = tmp_path / "crashed"  # a demo that died before writing its summary
    text, ok = C.claims_table([good, missing])
    assert not ok and "crashed" in text and "no such file" in text


def test_ctrlgen_demo_table_exit_code(tmp_path, capsys):
    from ctrlgen.lightning_modules import cli

    good = _summary(tmp_path, "ecm", [C.claim("canny_f1_margin", 0.12, "> 0.05")])
    bad = _summary(tmp_path, "other", [C.claim("speedup", 1.5, "> 2")])
    cli.main(["demo", "table", str(good)])  # all met: returns normally (exit 0)
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "table", str(good), str(bad)])
    assert e.value.code == 1
    assert "speedup" in capsys.readouterr().out


FAKE_CTRLGEN = """#!/bin/bash
# stands in for the ctrlgen console script: two "methods" whose demos copy a prepared summary.json
if [ "$1 $2" = "demo list" ]; then echo "good bad"; exit 0; fi
if [ "$1 $2" = "demo table" ]; then shift 2; exec "{py}" -c \\
  "import sys; from ctrlgen.lightning_modules.apps.claims import table_main as t; sys.exit(t(sys.argv[1:]))" "$@"; fi
[ "$1 $3" = "demo --out" ] || exit 9
mkdir -p "$4" && cp "{fixtures}/$2.json" "$4/summary.json"
"""


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_demo_runs_every_method_and_fails_on_an_unmet_claim(tmp_path):
    fixtures, binp = tmp_path / "fixtures", tmp_path / "bin"
    fixtures.mkdir()
    binp.mkdir()
    _summary(fixtures, "g", [C.claim("margin", 0.2, "> 0.05")], "good")
    _summary(fixtures, "b", [C.claim("ratio", 3.0, "< 1")], "bad")
    (fixtures / "g" / "summary.json").rename(fixtures / "good.json")
    (fixtures / "b" / "summary.json").rename(fixtures / "bad.json")
    fake = binp / "ctrlgen"
    fake.write_text(FAKE_CTRLGEN.format(py=sys.executable, fixtures=fixtures))
    fake.chmod(0o755)
    (binp / ".ready").touch()  # newer than pyproject.toml: the venv target has nothing to do
    os.utime(binp / ".ready", (os.stat(REPO / "pyproject.toml").st_mtime + 1,) * 2)

    def make(*extra):
        return subprocess.run(["make", "-s", "-C", str(REPO), "demo", f"BIN={binp}", f"DEMO_DIR={tmp_path / 'runs'}",
                               *extra], capture_output=True, text=True, timeout=300, env=cli_env(), check=False)
    r = make()
    assert r.returncode != 0, r.stdout + r.stderr
    assert "margin" in r.stdout and "ratio" in r.stdout and "1 of 2 claims NOT met" in r.stdout, r.stdout + r.stderr
    assert all((tmp_path / "runs" / m / "summary.json").exists() for m in ("good", "bad"))
    r = make("METHOD=good")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all 1 claims met" in r.stdout and "ratio" not in r.stdout
