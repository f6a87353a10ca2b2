"""The pass pipeline: the pass contract (passes.py), the pass table (registry.py), recipes
(recipes.py), running and verifying (run.py) and the record of what ran (record.py)."""

from onnxq.pipeline.passes import GraphPass, Kind, PassConditionError, PassContext
from onnxq.pipeline.recipes import builtin_recipes, load_recipe, make_pass
from onnxq.pipeline.record import read_record
from onnxq.pipeline.run import run_pipeline

__all__ = ["GraphPass", "Kind", "PassConditionError", "PassContext", "builtin_recipes", "load_recipe", "make_pass",
           "read_record", "run_pipeline"]
