"""jobs/demo.py --dry-run: the three steps' configs resolve against one run folder, nothing is trained."""

from __future__ import annotations

import json

from jobs import demo


def test_demo_dry_run_plans_all_three_steps(tmp_path, capsys):
    code = demo.main(["--config", "configs/tiny.yaml", "--storage", str(tmp_path), "--run-name", "smoke",
                      "--per-class", "7", "--fid-samples", "50", "--dry-run"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    plan = json.loads(captured.out.strip().splitlines()[-1])
    run = str(tmp_path / "smoke")
    assert plan["dry_run"] is True and plan["train"]["run"] == run
    assert plan["generate"]["model"]["run"] == run and plan["generate"]["plan"]["per_class"] == 7
    assert plan["generate"]["output"]["uri"] == f"{run}/generated"
    assert plan["evaluate"]["model"]["run"] == run and plan["evaluate"]["fid"]["samples"] == 50
    assert not (tmp_path / "smoke" / "generated").exists()


def test_demo_bad_setting_is_one_line(tmp_path, capsys):
    code = demo.main(["--config", "configs/tiny.yaml", "--storage", str(tmp_path), "--per-class", "0", "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "per_class" in err
