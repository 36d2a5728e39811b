"""Recipes: ``moecompress run RECIPE.yaml`` chains any stages (stats, prune, merge, quantize,
distill, eval, upload) from one YAML file; see :mod:`.schema` (reading and validation) and
:mod:`.runner` (running, resuming, the resolved recipe in the output)."""

from .runner import RECIPE_FILE, STAGES_DIR, fingerprint, run_recipe, run_stages
from .schema import KINDS, LIBRARY, Recipe, Stage, library_function, library_functions, load_recipe, recipe_schema

STAGES = KINDS  # stage name -> what it does with the current checkpoint

__all__ = ["RECIPE_FILE", "STAGES_DIR", "STAGES", "KINDS", "LIBRARY", "Recipe", "Stage", "fingerprint", "library_function",
           "library_functions", "load_recipe", "recipe_schema", "run_recipe", "run_stages"]
