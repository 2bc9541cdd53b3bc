"""Unknown keys in the sections that only tune speed or memory layout: one warning each, not an error.

In: a translated training config (a dict, after `automodel.translate`) and the schema's known dotted keys. Out:
the config without those keys, and one warning line per key. Why: upstream AutoModel configs gain new knobs in
these sections release by release (a kernel switch, a sharding detail); none of them changes what is trained,
so a config newer than chatft still runs. Everywhere else an unknown key stays an error, since a typo there
(`optimizer.lrr`) would silently change the result.
"""

from __future__ import annotations

from typing import Any

from chatft.config.automodel import does_not_apply

# The sections (dotted prefixes) where an unknown key only costs speed or memory layout, never the result.
SPEED_ONLY_SECTIONS = ("model.backend", "distributed", "dist_env", "compile")


def drop_unknown_speed_keys(config: dict[str, Any], known: set[str]) -> list[str]:
    """Remove, in place, every key under `SPEED_ONLY_SECTIONS` that `known` lacks; return one warning per key."""
    warnings = []
    for section in SPEED_ONLY_SECTIONS:
        node: Any = config
        for part in section.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            continue
        for key in list(node):
            path = f"{section}.{key}"
            if path not in known:
                warnings.append(does_not_apply(path, node.pop(key), "a key this chatft does not know, in a section "
                                                "that only tunes speed or memory layout: ignored"))
        if not node and section not in known:  # (`model.backend`) emptied of keys the schema has no section for
            config["model"].pop("backend")
    return warnings
