"""Several methods trained at one budget and compared (``balpoe-compare``): the budgets (``budgets``), the
runs and their evaluation (``runs``), the tables and files (``tables``)."""

from .budgets import BUDGETS, PAPER_CIFAR10_LT_IR100, Budget, budget_recipe
from .runs import Comparison, compare
from .tables import format_comparison, format_method_table

__all__ = ["BUDGETS", "PAPER_CIFAR10_LT_IR100", "Budget", "Comparison", "budget_recipe", "compare",
           "format_comparison", "format_method_table"]
