"""A benchmark's command line from its defaults: `--name` per keyword, typed like its default."""

from __future__ import annotations

import argparse
from typing import Any


def options(description: str, **defaults: Any) -> argparse.Namespace:
    """Parse `--flag-name value` for each `flag_name=default`; a default given as (value, help) carries
    its help text, and a type instead of a value makes the flag required."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in defaults.items():
        value, text = default if isinstance(default, tuple) else (default, None)
        flag = f"--{name.replace('_', '-')}"
        if isinstance(value, type):
            parser.add_argument(flag, type=value, required=True, help=text)
        else:
            parser.add_argument(flag, type=type(value), default=value, help=text)
    return parser.parse_args()
