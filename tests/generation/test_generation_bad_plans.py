"""Bad plans stop the CLI before any work: exit code 2, one line on stderr naming the problem, no output."""

from __future__ import annotations

import json
import os

import pytest

from jobs import generate_dataset


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = generate_dataset.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def mismatched_var(tmp_path, export_writer) -> str:
    """A VAR export built for other scales than the tiny tokenizer's (1, 2, 4)."""
    _, var_uri = export_writer(str(tmp_path / "other"), {"scales": (1, 2, 3)})
    return var_uri


@pytest.mark.parametrize("extra, message", [
    (["--per-class", "-1"], "plan.per_class: Input should be greater than or equal to 0 (got -1)"),
    (["--set", "plan.classes={class1: 3, class2: -4}"], "plan.classes.class2: Input should be greater than"),
    (["--set", "plan.classes={class1: 3, Sock: 2}"], "plan.classes: unknown class 'Sock'; the model has 10 classes"),
    (["--set", "plan.classes={12: 2}"], "plan.classes: unknown class '12'"),
    (["--per-class", "0"], "plan: every count is 0, nothing to generate"),
])
def test_bad_counts_and_classes(capsys, tmp_path, tiny_exports, extra, message):
    tokenizer, var = tiny_exports
    output = tmp_path / "set"
    code, out, err = run_cli(capsys, "--tokenizer", tokenizer, "--var", var, "--output", str(output), *extra)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and message in err, err
    assert not output.exists()  # nothing written, nothing started


def test_var_for_other_scales_is_refused(capsys, tmp_path, tiny_exports, mismatched_var):
    tokenizer, _ = tiny_exports
    output = tmp_path / "set"
    code, _, err = run_cli(capsys, "--tokenizer", tokenizer, "--var", mismatched_var, "--output", str(output),
                           "--per-class", "2")
    assert code == 2
    assert err.count("\n") == 1
    assert "model.var: scales: the transformer has [1, 2, 3] but the tokenizer has [1, 2, 4]" in err
    assert not output.exists()


def test_missing_export_is_refused(capsys, tmp_path, tiny_exports):
    tokenizer, _ = tiny_exports
    code, _, err = run_cli(capsys, "--tokenizer", tokenizer, "--var", str(tmp_path / "nowhere"),
                           "--output", str(tmp_path / "set"), "--per-class", "2")
    assert code == 2 and err.count("\n") == 1 and err.startswith("generate_dataset: model.var:")


def test_output_holding_another_plan_is_refused(capsys, tmp_path, tiny_exports):
    tokenizer, var = tiny_exports
    output = tmp_path / "set"
    output.mkdir()
    (output / "plan.json").write_text(json.dumps({"fingerprint": "0" * 64, "seed": 99}))
    code, _, err = run_cli(capsys, "--tokenizer", tokenizer, "--var", var, "--output", str(output),
                           "--per-class", "2")
    assert code == 2 and err.count("\n") == 1
    assert "holds a different plan" in err and "seed" in err
    assert os.listdir(output) == ["plan.json"]


def test_dry_run_prints_the_plan_and_writes_nothing(capsys, tmp_path, tiny_exports):
    tokenizer, var = tiny_exports
    output = tmp_path / "set"
    code, out, _ = run_cli(capsys, "--tokenizer", tokenizer, "--var", var, "--output", str(output),
                           "--set", "plan.classes={class3: 5, 7: 4}", "--set", "plan.unit_size=4", "--dry-run")
    assert code == 0
    summary = json.loads(out)
    assert summary["dry_run"] is True
    assert summary["images"] == 9 and summary["units"] == 3 and summary["units_todo"] == 3
    assert summary["per_class"] == {"class3": 5, "class7": 4}
    assert not output.exists()
