"""Typed job configs: YAML file + `--set a.b=value` overrides, validated by pydantic before any work.

A bad value stops the job with one line naming the field, e.g.
`config error: gpt.zero_stage: Input should be 0, 1, 2 or 3 (got 5)`.
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, PlainValidator, PrivateAttr, ValidationError

from pipeline.core.errors import VarrayError
from pipeline.core.storage import RELATIVE_LOCATIONS
from var_model import SamplingSettings

ConfigT = TypeVar("ConfigT", bound=BaseModel)


def _gpu_count(value: Any) -> str | float:
    if value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"must be a number >= 0 or 'auto' (got {value!r})")
    return float(value)


# A GPU count in a config: a number >= 0, or auto (pipeline.core.ray_runtime.resolve_gpus).
GpuCount = Annotated[Literal["auto"] | float, PlainValidator(_gpu_count)]


class ConfigError(VarrayError, ValueError):
    """A config value is invalid; the message is one line naming the field."""


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, numbers are finite, values are validated
    on assignment."""

    # allow_inf_nan: an infinite learning rate or a NaN weight is a typo, refused up front.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, allow_inf_nan=False)

    # Set by load_config on the root: the location fields that were given as relative paths
    # ("field=value"), already made absolute; a job joining a multi-node cluster refuses them.
    _relative_locations: tuple[str, ...] = PrivateAttr(default=())

    @property
    def relative_locations(self) -> tuple[str, ...]:
        return self._relative_locations


def _set_dotted(tree: dict[str, Any], dotted_key: str, value: Any) -> None:
    *parents, leaf = dotted_key.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config error: {dotted_key}: {part} is not a section")
    node[leaf] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=3` -> ("a.b", 3); the value is parsed as YAML, so lists, numbers and booleans work."""
    if "=" not in text:
        raise ConfigError(f"config error: override {text!r} must look like section.field=value")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


# A section's own validator raises ValueError("field: rule"); the field belongs after the section path.
_FIELD_RULE = re.compile(r"^(?P<field>[A-Za-z_][\w.]*): (?P<rule>.*)$", re.DOTALL)


def format_validation_error(error: ValidationError) -> str:
    first = error.errors()[0]
    path = [str(part) for part in first["loc"]]
    message = first["msg"]
    got = f" (got {first['input']!r})" if "input" in first and not isinstance(first["input"], dict) else ""
    if first["type"] == "value_error" and "error" in first.get("ctx", {}):
        message, got = str(first["ctx"]["error"]), ""
        match = _FIELD_RULE.match(message)
        if match is not None:
            path.append(match["field"])
            message = match["rule"]
    return f"config error: {'.'.join(path) or '<root>'}: {message}{got}"


def load_config(model: type[ConfigT], path: str | Path | None = None, overrides: list[str] | None = None,
                extra: dict[str, Any] | None = None) -> ConfigT:
    """Read YAML at `path` (optional), apply `extra` then `overrides`, validate into `model`.

    Every `Location` field comes out absolute (against the working directory) or as an s3:// URI.
    """
    tree: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config error: config file {path} does not exist") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config error: {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config error: {path} must hold a mapping at the top level")
        tree = loaded or {}
    for key, value in (extra or {}).items():
        if value is not None:
            _set_dotted(tree, key, value)
    for text in overrides or []:
        _set_dotted(tree, *parse_override(text))
    context: dict[str, Any] = {RELATIVE_LOCATIONS: []}
    try:
        config = model.model_validate(tree, context=context)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None
    if isinstance(config, StrictModel):
        config._relative_locations = tuple(context[RELATIVE_LOCATIONS])
    return config


def add_config_arguments(parser: argparse.ArgumentParser, default_config: str | None = None) -> None:
    """The flags every job shares: --config, --set (repeatable), --dry-run, --print-config."""
    parser.add_argument("--config", default=default_config, help="YAML config file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override one config value (repeatable), e.g. --set gpt.steps=200")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate the config and storage, print the plan, start nothing")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as YAML, every field with its value or default, and stop")


_SAMPLING_DEFAULTS = SamplingSettings()


class SamplingSection(StrictModel):
    """How tokens are drawn (var_model.SamplingSettings; defaults: the official FID settings)."""

    cfg: float = Field(_SAMPLING_DEFAULTS.cfg, ge=0, description="classifier-free guidance weight, ramped over "
                                                                 "the scales; 0: none")
    top_k: int = Field(_SAMPLING_DEFAULTS.top_k, ge=0, description="keep the k most likely codes; 0 disables")
    top_p: float = Field(_SAMPLING_DEFAULTS.top_p, ge=0, le=1, description="then the nucleus of this much "
                                                                           "probability; 0 or 1 keeps all")
    unguided_last_scales: int = Field(_SAMPLING_DEFAULTS.unguided_last_scales, ge=0,
                                      description="the last N scales drawn without the unconditional pass "
                                                  "(faster); 0: the official sampler")
    pruned_last_scales: int = Field(_SAMPLING_DEFAULTS.pruned_last_scales, ge=0,
                                    description="FastVAR-style pruning at the last N scales (faster); 0: none")
    prune_keep: float = Field(_SAMPLING_DEFAULTS.prune_keep, gt=0, le=1,
                              description="share of the tokens recomputed at a pruned scale")

    @property
    def settings(self) -> SamplingSettings:
        return SamplingSettings(**self.model_dump(include=set(SamplingSettings.__dataclass_fields__)))
