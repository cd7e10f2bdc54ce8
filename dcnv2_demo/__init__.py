"""The CPU demo behind `tools/demo.py`: trains the ablation's models on the
embedded shapes dataset, evaluates them with COCOEvaluator and writes a
comparison table, a loss plot and sampling-location pictures."""

from .models import DEMO_MODELS, DemoModel
from .pipeline import DemoOptions, run_demo

__all__ = ["DEMO_MODELS", "DemoModel", "DemoOptions", "run_demo"]
