"""Training recipes, one module per method; ``get_recipe(name)`` returns a fresh instance."""

from __future__ import annotations

import importlib

from training.trainer import Recipe

RECIPES: dict[str, str] = {
    "irra": "training.recipes.irra:IRRARecipe",
    "ivt": "training.recipes.ivt:IVTRecipe",
    "laps": "training.recipes.laps:LapsRecipe",
    "scanformer": "training.recipes.scanformer:ScanFormerRecipe",
    "magnet": "training.recipes.magnet:MagNetRecipe",
}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown method {name!r}; known: {sorted(RECIPES)}")
    module_name, class_name = RECIPES[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)()
