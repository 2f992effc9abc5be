"""Several methods trained at one budget and compared (``balpoe-compare``)."""

from .runs import BUDGETS, Budget, Comparison, budget_recipe, compare, format_method_table

__all__ = ["BUDGETS", "Budget", "Comparison", "budget_recipe", "compare", "format_method_table"]
