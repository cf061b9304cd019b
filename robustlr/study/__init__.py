"""Whole studies from one recipe file (``robustlr run``): train and adversarially train each
network, evaluate every run with the recipe's attacks, and write the Table 9 report; every
stage is skipped when its outputs are complete, so a killed study resumes."""

from robustlr.study.recipe import Recipe, RecipeError, load_recipe, recipe_path
from robustlr.study.runner import (
    StudyResult,
    default_out_dir,
    run_stage,
    run_study,
    study_status,
)
from robustlr.study.stages import DONE, PENDING, Stage, StageStatus, plan_stages, stage_status

__all__ = [
    "DONE",
    "PENDING",
    "Recipe",
    "RecipeError",
    "Stage",
    "StageStatus",
    "StudyResult",
    "default_out_dir",
    "load_recipe",
    "plan_stages",
    "recipe_path",
    "run_stage",
    "run_study",
    "stage_status",
    "study_status",
]
