"""Training recipes that compare sigmoid and softmax attention offline: a byte-level LM, a small ViT and CTC ASR.

The loop itself is ``sigattn.recipes.train.train`` (not re-exported: the name is its module's).
"""

from sigattn.recipes.compare import run_comparison
from sigattn.recipes.train import RECIPES, Recipe, get_recipe
from sigattn.recipes.variants import VARIANTS, Variant, get_variants

__all__ = ["RECIPES", "VARIANTS", "Recipe", "Variant", "get_recipe", "get_variants", "run_comparison"]
