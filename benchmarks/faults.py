"""Fault injection: kill the drivers of the real CLIs at chosen moments, rerun them, count what was lost.

- generation (jobs/generate_dataset.py on a tiny random-weight export written here, no training),
  killed with SIGKILL at three moments: before any unit is published, right after the first unit is
  published, and midway (half the units published, the rest being made);
- training (jobs/train_var.py --config configs/tiny.yaml, a few steps, on temp storage), killed
  once, after its first checkpoint.
Each is rerun to completion. Prints one JSON line (last on stdout): faults tried, survived (the
rerun finished with rc 0 and the whole output), rows lost, rows duplicated, orphan processes left
(processes of the killed driver's Ray session alive 5 s after the kill). Takes a few minutes.

    python benchmarks/faults.py [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.core.reaper import session_processes  # noqa: E402

PER_CLASS, UNIT_SIZE, CLASSES = 12, 5, 10
SESSION = re.compile(r"(/tmp/ray/session_[^/\s]+)")


def env() -> dict[str, str]:
    merged = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    merged.update({"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "DS_ACCELERATOR": "cpu",
                   "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"})
    return merged


def write_exports(root: Path) -> tuple[str, str]:
    import torch

    from pipeline.core.exports import save_tokenizer, save_var
    from var_model import VAR, VQVAE, TokenizerConfig, VARConfig

    torch.manual_seed(0)
    tokenizer = TokenizerConfig(image_size=16, in_channels=1, scales=(1, 2, 4), codebook_size=64, embed_dim=8,
                                base_channels=16, channel_multipliers=(1, 2, 2), num_res_blocks=1,
                                use_attention=False, norm_groups=8)
    var = VARConfig(hidden_size=32, num_layers=2, num_heads=2, scales=(1, 2, 4), codebook_size=64, embed_dim=8,
                    num_classes=CLASSES, drop_path=0.0)
    save_tokenizer(VQVAE(tokenizer), str(root / "tokenizer"))
    save_var(VAR(var), str(root / "var"), extra={"class_names": [f"class{i}" for i in range(CLASSES)]})
    return str(root / "tokenizer"), str(root / "var")


def session_of(pid: int) -> str | None:
    import psutil

    try:
        for child in psutil.Process(pid).children(recursive=True):
            match = SESSION.search(" ".join(child.cmdline()))
            if match:
                return match.group(1)
    except psutil.Error:
        pass
    return None


def kill_when(command: list[str], ready, log: Path, timeout: float = 600) -> tuple[bool, int]:
    """Start `command`, SIGKILL it when ready() holds; returns (killed, orphans 5 s after the kill)."""
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=REPO, env=env(), stdout=out, stderr=subprocess.STDOUT)
        session, deadline = None, time.monotonic() + timeout
        while process.poll() is None and time.monotonic() < deadline and not ready():
            session = session or session_of(process.pid)
            time.sleep(0.05)
        session = session or session_of(process.pid)
        if process.poll() is not None:
            return False, 0
        process.send_signal(signal.SIGKILL)
        process.wait()
    time.sleep(5)
    left = session_processes(session) if session else []
    for leftover in left:  # count them, then end them: the next fault starts clean
        try:
            leftover.kill()
        except Exception:
            pass
    return True, len(left)


def count_rows(output: Path) -> tuple[int, int, int]:
    """(rows lost, rows duplicated, rows) of a generated set against its plan."""
    import pyarrow.parquet as pq

    table = pq.read_table(output / "data")
    keys = table.column("key").to_pylist()
    expected = PER_CLASS * CLASSES
    return max(expected - len(set(keys)), 0), len(keys) - len(set(keys)), len(keys)


def generation_faults(work: Path, exports: tuple[str, str]) -> list[dict]:
    results = []
    for moment in ("before_any_unit", "mid_run", "after_publish"):
        output = work / f"generated_{moment}"
        stats = output / "stats"
        command = [sys.executable, "jobs/generate_dataset.py", "--tokenizer", exports[0], "--var", exports[1],
                   "--output", str(output), "--per-class", str(PER_CLASS), "--set", f"plan.unit_size={UNIT_SIZE}",
                   "--set", "sampling.batch_size=1", "--set", "compute.num_cpus=0.5",
                   "--set", "compute.local_num_cpus=2"]
        published = lambda: len(list(stats.glob("*.json"))) if stats.exists() else 0  # noqa: E731
        units = PER_CLASS * CLASSES // UNIT_SIZE

        def ready() -> bool:
            if moment == "before_any_unit":
                return (output / "plan.json").exists() and published() == 0
            if moment == "after_publish":  # right after the first unit is published
                return published() >= 1
            return published() >= units // 2  # midway: half the units done, the others being made

        killed, orphans = kill_when(command, ready, work / f"{moment}.log")
        done_at_kill = published()
        rerun = subprocess.run(command, cwd=REPO, env=env(), capture_output=True, text=True, timeout=900)
        lost, duplicated, rows = count_rows(output) if rerun.returncode == 0 else (PER_CLASS * CLASSES, 0, 0)
        results.append({"fault": f"generate:{moment}", "killed": killed, "units_done_at_kill": done_at_kill,
                        "rerun_rc": rerun.returncode, "rows": rows, "rows_lost": lost,
                        "rows_duplicated": duplicated, "orphans": orphans,
                        "survived": killed and rerun.returncode == 0 and lost == 0 and duplicated == 0,
                        "rerun_tail": rerun.stderr.strip().splitlines()[-1:] if rerun.returncode else []})
    return results


def training_fault(work: Path) -> dict:
    storage = work / "runs"
    command = [sys.executable, "jobs/train_var.py", "--config", "configs/tiny.yaml", "--storage", str(storage),
               "--run-name", "faults", "--set", "tokenizer.steps=4", "--set", "gpt.steps=4"]
    ready = lambda: any(storage.glob("faults/*/*/checkpoint_*")) or any(storage.glob("faults/**/step_*"))  # noqa: E731
    killed, orphans = kill_when(command, ready, work / "train.log", timeout=900)
    rerun = subprocess.run(command, cwd=REPO, env=env(), capture_output=True, text=True, timeout=1800)
    exported = any(storage.glob("faults/gpt/export/*"))
    return {"fault": "train:after_first_checkpoint", "killed": killed, "rerun_rc": rerun.returncode,
            "orphans": orphans, "survived": killed and rerun.returncode == 0 and exported,
            "rerun_tail": rerun.stderr.strip().splitlines()[-1:] if rerun.returncode else []}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", help="work folder to keep (default: a temp folder, removed)")
    parser.add_argument("--skip-training", action="store_true", help="only the generation faults")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="varray-faults-") as temp:
        work = Path(args.keep or temp)
        work.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        results = generation_faults(work, write_exports(work / "exports"))
        if not args.skip_training:
            results.append(training_fault(work))
        for result in results:
            print(json.dumps(result), flush=True)
        print(json.dumps({
            "benchmark": "faults", "faults_tried": len(results),
            "faults_survived": sum(r["survived"] for r in results),
            "rows_lost": sum(r.get("rows_lost", 0) for r in results),
            "rows_duplicated": sum(r.get("rows_duplicated", 0) for r in results),
            "orphan_processes_left": sum(r["orphans"] for r in results),
            "seconds": round(time.monotonic() - started, 1)}), flush=True)


if __name__ == "__main__":
    main()
