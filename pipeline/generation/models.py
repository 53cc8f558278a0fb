"""Find and check the two exports a generation run uses: their config.json files and weights checksums."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.core.exports import TOKENIZER_FORMAT, VAR_FORMAT, ExportError, read_export_info, verify_weights
from pipeline.core.layout import EXPORT_DIR, GPT_RUN, TOKENIZER_RUN
from pipeline.core.storage import StorageError, exists, join_uri
from pipeline.generation.plan import PlanError
from var_model import TokenizerConfig, VARConfig, check_pair

# Where a train_var run keeps its exports (relative to the run folder): today's layout first, then
# the folders older runs used.
RUN_EXPORTS = {
    "tokenizer": ((TOKENIZER_RUN, EXPORT_DIR), (TOKENIZER_RUN,)),
    "var": ((GPT_RUN, EXPORT_DIR), ("var", EXPORT_DIR), (GPT_RUN,), ("var",)),
}


@dataclass(frozen=True)
class ModelPair:
    tokenizer_uri: str
    var_uri: str
    tokenizer_info: dict[str, Any]
    var_info: dict[str, Any]

    @property
    def tokenizer_checksum(self) -> str:
        return self.tokenizer_info["checksum"]

    @property
    def var_checksum(self) -> str:
        return self.var_info["checksum"]

    @property
    def num_classes(self) -> int:
        return int(self.var_info["config"]["num_classes"])

    @property
    def image_size(self) -> int:
        return int(self.tokenizer_info["config"]["image_size"])

    @property
    def channels(self) -> int:
        return int(self.tokenizer_info["config"]["in_channels"])

    def class_names(self) -> list[str] | None:
        """Class names recorded with either export (training provenance), if any."""
        for info in (self.var_info, self.tokenizer_info):
            names = info.get("class_names") or (info.get("data") or {}).get("class_names")
            if names:
                return [str(name) for name in names]
        return None


def find_run_export(run_uri: str, kind: str) -> str:
    candidates = [join_uri(run_uri, *parts) for parts in RUN_EXPORTS[kind]]
    for candidate in candidates:
        if exists(join_uri(candidate, "config.json")):
            return candidate
    raise PlanError(f"model.run: no {kind} export under {run_uri} (looked in {', '.join(candidates)})")


def _info(uri: str, field: str, expected_format: str) -> dict[str, Any]:
    try:
        info = read_export_info(uri)
    except (StorageError, ExportError) as exc:
        raise PlanError(f"model.{field}: {exc}") from None
    if info.get("format") != expected_format:
        raise PlanError(f"model.{field}: {uri} is a {info.get('format')!r} export, expected {expected_format!r}")
    return info


def resolve_models(run: str | None, tokenizer: str | None, var: str | None) -> ModelPair:
    """Locate both exports, check that the transformer was built for this tokenizer and that each
    export's weights match the checksum in its config.json (reads both weight files once)."""
    tokenizer_uri = tokenizer or find_run_export(run, "tokenizer")
    var_uri = var or find_run_export(run, "var")
    tokenizer_info = _info(tokenizer_uri, "tokenizer", TOKENIZER_FORMAT)
    var_info = _info(var_uri, "var", VAR_FORMAT)
    try:  # where two exports meet: the transformer must have been trained on this tokenizer's tokens
        check_pair(TokenizerConfig.from_dict(tokenizer_info["config"]), VARConfig.from_dict(var_info["config"]))
    except ValueError as exc:
        raise PlanError(f"model.var: {exc} ({var_uri} was not trained on {tokenizer_uri})") from None
    # The weights as well, here in the driver: a damaged file is one line now, not an actor failure later.
    for field, uri, info in (("tokenizer", tokenizer_uri, tokenizer_info), ("var", var_uri, var_info)):
        try:
            verify_weights(uri, info)
        except (StorageError, ExportError) as exc:
            raise PlanError(f"model.{field}: {exc}") from None
    return ModelPair(tokenizer_uri, var_uri, tokenizer_info, var_info)
