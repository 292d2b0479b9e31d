"""One registry for every backbone and its size presets.

A backbone is a class registered with :func:`register_backbone`; a preset is a named set of
constructor options registered with :func:`register_preset`. Every backbone obeys one contract
(see ``docs/model-contract.md``)::

    model = Backbone(input_size=H, in_channels=C, num_classes=K, learn_sigma=True, **options)
    out = model(x, t, y)   # x: (B, C, H, W), t: (B,) int64 in [0, T), y: (B,) int64 or None
    out.shape == (B, 2C if learn_sigma else C, H, W)

Class-conditional models embed labels with a table of ``num_classes + 1`` rows; the last row is
the "null" label used for classifier-free guidance. Label dropout happens in the training loop,
not in the model, so every backbone drops labels the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch.nn as nn

BACKBONES: dict[str, type[nn.Module]] = {}
PRESETS: dict[str, "Preset"] = {}


@dataclass(frozen=True)
class Preset:
    name: str
    backbone: str
    options: dict[str, Any] = field(default_factory=dict)
    # Published counts to check against (seed/anchor), e.g. {"gflops": 0.36, "params": 33e6, "input": (4, 32)}.
    # Optional keys: "source", "convention" (how "gflops" was counted, a key of
    # diffbias.metrics.flops.CONVENTIONS; "diffbias" when absent), "mult_adds" (G, torchinfo convention),
    # "reproducible" (False: no configuration of the model gives it; shown, not tested), "note".
    reference: dict[str, Any] = field(default_factory=dict)
    tiny: bool = False  # a CPU preset, exercised by the contract test
    # Further published counts of the same model from other sources (same keys as ``reference``; "input"
    # and "num_classes" default to the reference's), e.g. paper 002's count of DiT-XL/2 in its own convention.
    published: tuple[dict[str, Any], ...] = ()

    def references(self) -> list[dict[str, Any]]:
        """Every published count of this preset, the primary ``reference`` first, each with its
        "convention" filled in ("diffbias" when not stated)."""
        out = []
        counts = ("params", "gflops", "mult_adds")
        for ref in [r for r in [self.reference, *self.published] if any(r.get(k) is not None for k in counts)]:
            base = {k: self.reference[k] for k in ("input", "num_classes") if k in self.reference}
            out.append({"convention": "diffbias", **base, **ref})
        return out


def register_backbone(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        if name in BACKBONES and BACKBONES[name] is not cls:
            raise ValueError(f"backbone {name!r} registered twice")
        BACKBONES[name] = cls
        cls.backbone_name = name
        return cls

    return wrap


def register_preset(name: str, backbone: str, *, tiny: bool = False, reference: dict | None = None,
                    published: tuple[dict, ...] | list[dict] = (), **options) -> Preset:
    if name in PRESETS:
        raise ValueError(f"preset {name!r} registered twice")
    preset = Preset(name, backbone, dict(options), dict(reference or {}), tiny, tuple(dict(r) for r in published))
    PRESETS[name] = preset
    return preset


def resolve_options(backbone: str | None, preset: str | None, options: dict | None) -> tuple[str, dict]:
    """Merge a preset's options with explicit overrides; return (backbone, options)."""
    merged: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise KeyError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
        p = PRESETS[preset]
        if backbone is not None and backbone != p.backbone:
            raise ValueError(f"preset {preset!r} belongs to backbone {p.backbone!r}, not {backbone!r}")
        backbone = p.backbone
        merged.update(p.options)
    if backbone is None:
        raise ValueError("a variant needs a backbone or a preset")
    if backbone not in BACKBONES:
        raise KeyError(f"unknown backbone {backbone!r}; known: {sorted(BACKBONES)}")
    merged.update(options or {})
    return backbone, merged


def build_model(
    backbone: str | None = None,
    preset: str | None = None,
    options: dict | None = None,
    *,
    input_size: int,
    in_channels: int,
    num_classes: int = 0,
    learn_sigma: bool = True,
) -> nn.Module:
    name, opts = resolve_options(backbone, preset, options)
    return BACKBONES[name](
        input_size=input_size, in_channels=in_channels, num_classes=num_classes, learn_sigma=learn_sigma, **opts
    )
