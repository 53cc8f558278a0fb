"""Live reports of a training stage: every logged interval, written as it happens (rank 0 only).

`config.report_to` chooses the targets, all in the stage's run folder `<storage>/<run>/<stage>/`:

  events.out.tfevents.*      tensorboard: one scalar per metric per interval, sample grids as images
  metrics.csv                csv: one row per interval, `step` first, a column per metric (a metric
                             that first appears later rewrites the header; a missing value is empty)
  samples/step_<n>.png       sample grids (a stage that makes them, e.g. the GPT stage's sample_every)
  wandb/                     wandb: the run's files (Weights & Biases is an optional import;
                             WANDB_MODE=offline keeps it on disk, `wandb sync` uploads it later)

Each interval is flushed before training goes on, so `tensorboard --logdir <storage>/<run>` follows a
run while it trains. On S3 the files are written to a local folder on the worker and the changed ones
are uploaded after each interval (object stores have no append). A resumed stage rewrites the CSV from
the checkpoint's metrics history and hides the event records past the resumed step (TensorBoard's
purge_step), so the redone steps are not shown twice.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.core.errors import VarrayError
from pipeline.core.storage import is_s3, join_uri, write_bytes_atomic

REPORT_TARGETS = ("tensorboard", "csv", "wandb")
CSV_FILE = "metrics.csv"
SAMPLES_DIR = "samples"


class ReportError(VarrayError):
    """A report target cannot be used here; one line naming the field."""


def check_report_to(report_to: Sequence[str]) -> None:
    """Driver side, before any worker starts: every requested target can be imported."""
    if "wandb" in report_to:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ReportError("report_to: wandb is not installed (pip install wandb, or leave wandb out of "
                              "report_to)") from None
    if "tensorboard" in report_to:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            raise ReportError("report_to: tensorboard is not installed (pip install tensorboard, or leave "
                              "tensorboard out of report_to)") from None


def worker_environment(report_to: Sequence[str]) -> dict[str, str]:
    """The driver's WANDB_* settings (mode, project, key...), passed on to the Ray Train workers."""
    if "wandb" not in report_to:
        return {}
    return {name: value for name, value in os.environ.items() if name.startswith("WANDB_")}


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {name: float(value) for name, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and name != "step"}


class LiveReport:
    """Rank 0's writer of the logged intervals of one stage (see the module docstring)."""

    def __init__(self, run_uri: str, stage: str, report_to: Sequence[str], history: Sequence[dict[str, Any]] = (),
                 resumed_step: int = 0, config: dict[str, Any] | None = None):
        self.run_uri, self.stage = run_uri, stage
        self.remote = is_s3(run_uri)
        # Where the files are written: the run folder itself, or a local mirror of it (S3).
        self.folder = tempfile.mkdtemp(prefix=f"varray-{stage}-report-") if self.remote else run_uri
        os.makedirs(self.folder, exist_ok=True)
        self._uploaded: dict[str, tuple[int, int]] = {}
        self._rows: list[dict[str, float]] = []
        self._columns: list[str] = []
        self.csv_path = os.path.join(self.folder, CSV_FILE) if "csv" in report_to else None
        if self.csv_path is not None:
            # The history's logged intervals (a final checkpoint-only record holds nothing but its step).
            self._rows = [{"step": record["step"], **_scalars(record)} for record in history
                          if "step" in record and _scalars(record)]
            self._rewrite_csv()
        self.writer = None
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            # Records at or after the first step of this attempt, left by an earlier one, are hidden.
            self.writer = SummaryWriter(log_dir=self.folder, purge_step=resumed_step + 1, flush_secs=3600)
        self.wandb = None
        if "wandb" in report_to:
            self.wandb = _start_wandb(run_uri, stage, self.folder, config or {})
        self.sync()

    # -------------------------------------------------------------- the targets

    def log(self, metrics: dict[str, Any]) -> None:
        """One logged interval (`metrics["step"]` is its step), flushed and synced before returning."""
        step = int(metrics["step"])
        values = _scalars(metrics)
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)
            self.writer.flush()
        if self.csv_path is not None:
            self._append_csv({"step": step, **values})
        if self.wandb is not None:
            self.wandb.log(values, step=step)
        self.sync()

    def image(self, name: str, step: int, grid: np.ndarray, png: bytes) -> str:
        """A picture of this step (uint8 [H, W, C]): `samples/step_<n>.png` and a TensorBoard image."""
        relative = f"{SAMPLES_DIR}/step_{step:08d}.png"
        write_bytes_atomic(join_uri(self.run_uri, relative), png)
        if self.writer is not None:
            self.writer.add_image(name, grid, step, dataformats="HWC")
            self.writer.flush()
        if self.wandb is not None:
            import wandb

            self.wandb.log({name: wandb.Image(grid)}, step=step)
        self.sync()
        return join_uri(self.run_uri, relative)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
        self.sync()
        if self.remote:
            shutil.rmtree(self.folder, ignore_errors=True)

    # -------------------------------------------------------------- CSV

    def _append_csv(self, row: dict[str, float]) -> None:
        self._rows.append(row)
        if any(name not in self._columns for name in row):
            self._rewrite_csv()  # a new metric: a new header, the earlier rows with empty cells
            return
        with open(self.csv_path, "a", newline="") as file:
            csv.DictWriter(file, self._columns, restval="").writerow(row)
            file.flush()

    def _rewrite_csv(self) -> None:
        names = {name for row in self._rows for name in row} - {"step"}
        self._columns = ["step", *sorted(names)]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, self._columns, restval="")
        writer.writeheader()
        writer.writerows(self._rows)
        temporary = f"{self.csv_path}.tmp"
        with open(temporary, "w", newline="") as file:
            file.write(buffer.getvalue())
        os.replace(temporary, self.csv_path)

    # -------------------------------------------------------------- S3

    def sync(self) -> None:
        """Upload every file of the local mirror that changed since the last sync (S3 only)."""
        if not self.remote:
            return
        for top, _, names in os.walk(self.folder):
            for name in names:
                path = os.path.join(top, name)
                relative = os.path.relpath(path, self.folder).replace(os.sep, "/")
                stat = os.stat(path)
                if self._uploaded.get(relative) == (stat.st_size, stat.st_mtime_ns) or name.endswith(".tmp"):
                    continue
                with open(path, "rb") as file:
                    write_bytes_atomic(join_uri(self.run_uri, relative), file.read())
                self._uploaded[relative] = (stat.st_size, stat.st_mtime_ns)


def _start_wandb(run_uri: str, stage: str, folder: str, config: dict[str, Any]):
    try:
        import wandb
    except ImportError:  # checked on the driver; a worker image without it says so in one line too
        raise ReportError("report_to: wandb is not installed on the workers (pip install wandb)") from None
    name = "/".join(run_uri.rstrip("/").split("/")[-2:])  # <run>/<stage>
    run_id = f"{stage}-{hashlib.sha256(run_uri.encode()).hexdigest()[:12]}"  # a restart continues the same run
    return wandb.init(project=os.environ.get("WANDB_PROJECT", "varray"), name=name, id=run_id, resume="allow",
                      dir=folder, config=config, group=name.split("/")[0])


__all__ = ["CSV_FILE", "REPORT_TARGETS", "SAMPLES_DIR", "LiveReport", "ReportError", "check_report_to",
           "worker_environment"]
