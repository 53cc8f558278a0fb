"""The one contract between the tokenizer and the transformer: the transformer predicts the tokenizer's
tokens, so it has the tokenizer's scales, codebook size and latent width (official patch_nums, V, Cvae).

These three values belong to the tokenizer. A transformer config takes them from it (`paired`), and
`check_pair` is called only where two separately made models meet (loading a pair of exports).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from var_model.tokenizer_config import TokenizerConfig

if TYPE_CHECKING:  # var_config builds its presets with contract_of
    from var_model.var_config import VARConfig

CONTRACT_FIELDS = ("scales", "codebook_size", "embed_dim")


def contract_of(tokenizer: TokenizerConfig) -> dict[str, Any]:
    """The tokenizer's side of the contract, as VARConfig field values."""
    return {name: getattr(tokenizer, name) for name in CONTRACT_FIELDS}


def paired(var: VARConfig, tokenizer: TokenizerConfig) -> VARConfig:
    """`var` with the tokenizer's scales, codebook size and latent width."""
    return dataclasses.replace(var, **contract_of(tokenizer))


def check_pair(tokenizer: TokenizerConfig, var: VARConfig) -> None:
    """Raise ValueError naming the first contract field on which `var` was not built for `tokenizer`."""
    for name in CONTRACT_FIELDS:
        ours, theirs = getattr(var, name), getattr(tokenizer, name)
        if ours != theirs:
            raise ValueError(f"{name}: the transformer has {_plain(ours)} but the tokenizer has {_plain(theirs)}")


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
