"""Config trees as plain nested dicts: the one merge rule that configs, pipelines and DeepSpeed overrides share."""

from __future__ import annotations

import copy
from typing import Any


def merge_trees(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of ``base`` with ``update`` merged in: nested dicts merge key by key, anything else replaces."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_trees(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out
