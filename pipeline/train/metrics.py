"""Training metrics: per-micro-batch values summed locally, averaged over all ranks at each report.

A metric may be a scalar or a 1-d tensor (e.g. one loss per scale); 1-d metrics are reported as
`<name>_<index>` (e.g. `scale_loss_3`). Each is the mean over the micro-batches that reported it
(a term that starts midway, like a discriminator's, is not diluted by the ones before). Every rank
must report the same names in an interval. One all-reduce per report, not per step.
"""

from __future__ import annotations

import json
import time

import torch
import torch.distributed as dist


class MetricsAccumulator:
    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.micro_batches = 0
        self.samples = 0
        self.data_wait_seconds = 0.0
        self.started = time.perf_counter()

    def add(self, metrics: dict[str, torch.Tensor], samples: int) -> None:
        for name, value in metrics.items():
            value = value.detach().float().reshape(-1)
            self.sums[name] = self.sums[name] + value if name in self.sums else value.clone()
            self.counts[name] = self.counts.get(name, 0) + 1
        self.micro_batches += 1
        self.samples += samples

    def reduce(self) -> dict[str, float]:
        """Means over all ranks' micro-batches since the last reset (a collective); then reset."""
        names = sorted(self.sums)
        sizes = [self.sums[name].numel() for name in names]
        local = [self.sums[name].to(self.device) for name in names]
        local += [torch.tensor([float(self.counts[name]) for name in names], device=self.device)] if names else []
        counters = torch.tensor([self.micro_batches, self.samples, self.data_wait_seconds],
                                dtype=torch.float32, device=self.device)
        flat = torch.cat(local + [counters]) if local else counters
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flat)
            world = dist.get_world_size()
        else:
            world = 1
        elapsed = time.perf_counter() - self.started
        micro_batches, samples, data_wait = flat[-3:].tolist()
        values = flat[:-3].cpu()
        counts = values[sum(sizes):].tolist()
        out: dict[str, float] = {}
        offset = 0
        for name, size, count in zip(names, sizes, counts):
            chunk = (values[offset:offset + size] / max(count, 1)).tolist()
            offset += size
            if size == 1:
                out[name] = chunk[0]
            else:
                out.update({f"{name}_{index}": item for index, item in enumerate(chunk)})
        out["samples_per_second"] = samples / elapsed if elapsed > 0 else 0.0
        out["data_wait_seconds"] = data_wait / world  # per worker, over the interval
        out["data_wait_fraction"] = out["data_wait_seconds"] / elapsed if elapsed > 0 else 0.0
        self.reset()
        return out


def progress_line(stage: str, metrics: dict[str, float], total_steps: int) -> str:
    """One console line per report (rank 0)."""
    parts = [f"[{stage}] step {int(metrics['step'])}/{total_steps}", f"epoch {int(metrics['epoch'])}",
             f"loss {metrics['loss']:.4f}", f"lr {metrics['learning_rate']:.2e}",
             f"{metrics['samples_per_second']:.1f} samples/s", f"data wait {metrics['data_wait_fraction']:.0%}"]
    for name in ("reconstruction_l2", "codebook_usage", "codebook_perplexity", "adaptive_weight", "discriminator_loss",
                 "accuracy", "val_loss", "val_accuracy", "val_psnr_db", "val_rfid"):
        if name in metrics:
            parts.append(f"{name} {metrics[name]:.4g}")
    if "eta_seconds" in metrics and int(metrics["step"]) < total_steps:
        parts.append(f"ETA {_duration(metrics['eta_seconds'])}")
    return " | ".join(parts)


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def to_jsonl(history: list[dict]) -> str:
    return "".join(json.dumps(record, sort_keys=True) + "\n" for record in history)


def from_jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]
