"""Start a run from the released VAR tokenizer instead of training stage 1."""

from __future__ import annotations

from typing import Any

from pipeline.chain.checks import ChainError
from pipeline.chain.config import TrainVarConfig
from pipeline.core.layout import RunLayout


def import_official_tokenizer(config: TrainVarConfig, checkpoint: str, layout: RunLayout | None = None) -> dict[str, Any]:
    """Publish the released VAR tokenizer (e.g. vae_ch160v4096z32.pth) as the run's tokenizer export, so
    the chain skips stage 1 and encodes with the official weights. Its inferred config must equal the
    config's tokenizer model."""
    from pipeline.core.exports import save_tokenizer
    from var_model import load_official_tokenizer

    layout = layout or config.layout
    wanted = config.tokenizer_model
    try:
        model = load_official_tokenizer(checkpoint, image_size=wanted.image_size, scales=wanted.scales)
    except (OSError, ValueError) as exc:  # missing file, not a state dict, keys or shapes that do not match
        raise ChainError(f"--checkpoint {checkpoint}: {str(exc).splitlines()[0]}") from None
    expected = wanted.to_dict()
    for name, value in model.config.to_dict().items():
        if value != expected[name]:
            raise ChainError(f"tokenizer.model.{name}: the checkpoint has {value!r}, the config {expected[name]!r}")
    checksum = save_tokenizer(model, layout.tokenizer_export, extra={"source": "official", "checkpoint": checkpoint})
    return {"tokenizer_export": layout.tokenizer_export, "checksum": checksum}
