"""Backbones. Every module in this package registers its backbones and presets on import."""

import importlib
import pkgutil

from .registry import BACKBONES, PRESETS, Preset, build_model, register_backbone, register_preset, resolve_options

# Import every backbone module so that registering a backbone is just adding a module here.
for _info in pkgutil.iter_modules(__path__):
    if _info.name not in {"registry", "layers"}:
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["BACKBONES", "PRESETS", "Preset", "build_model", "register_backbone", "register_preset", "resolve_options"]
