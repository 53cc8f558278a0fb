"""Helpers shared by the training tests (imported by name: pytest puts this folder on sys.path)."""

from __future__ import annotations

import json
import os


def read_metrics(export_uri: str) -> list[dict]:
    from pipeline.core.storage import join_uri, read_bytes

    return [json.loads(line) for line in read_bytes(join_uri(export_uri, "metrics.jsonl")).decode().splitlines()]


def checkpoint_names(run_dir: str) -> list[str]:
    return sorted(name for name in os.listdir(run_dir) if name.startswith("step_"))


# Tiny models of our own (the var_model presets may change): 16 px grayscale, scales (1, 2, 4).
TINY_TOKENIZER = dict(image_size=16, in_channels=1, scales=[1, 2, 4], codebook_size=64, embed_dim=8,
                      base_channels=16, channel_multipliers=[1, 2, 2], num_res_blocks=1, use_attention=False,
                      norm_groups=8)
TINY_VAR = dict(hidden_size=32, num_layers=2, num_heads=2, scales=[1, 2, 4], codebook_size=64, embed_dim=8,
                num_classes=10, drop_path=0.0, init_adaln_gamma=1e-3)
