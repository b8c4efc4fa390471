"""Mixed-precision allocation: cost models, sensitivities and the exact ILP under budgets."""

from mpq.allocate.ilp import InfeasibleBudgetError, min_costs, solve_greedy, solve_ilp

__all__ = ["InfeasibleBudgetError", "min_costs", "solve_greedy", "solve_ilp"]
