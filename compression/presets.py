"""Named sets of compressor options.

``seed-compat`` reproduces the original study's code: sparse 1x16 tiles keeping the largest
signed value, int1 with no scale. ``default`` is this tool's choice: 4x4 tiles (as the original
README describes the method) keeping the largest magnitude, int1 with the per-row scale.
"""

from __future__ import annotations

from typing import Any

from compression.registry import make_config

PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "seed-compat": {"block": (1, 16), "keep": "max", "scale": "none"},
}


def build_configs(methods: list[str], preset: str = "default", **overrides: Any) -> dict[str, Any]:
    """One config per method name: the preset's options, then any override that is not None."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    options = dict(PRESETS[preset])
    options.update({k: v for k, v in overrides.items() if v is not None})
    return {method: make_config(method, **options) for method in methods}
