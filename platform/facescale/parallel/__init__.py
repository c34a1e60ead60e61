"""Model-parallel classifier: Partial FC, its sparse optimizers, the memory planner (range files: checkpoint/)."""

from facescale.parallel.optim import SparseRowAdamW, SparseRowSGD, build_partial_fc_optimizer
from facescale.parallel.partial_fc import PartialFC, filter_inter_class
from facescale.parallel.row_state import state_bytes_per_row, stochastic_round_bf16

__all__ = [
    "PartialFC",
    "SparseRowAdamW",
    "SparseRowSGD",
    "build_partial_fc_optimizer",
    "filter_inter_class",
    "state_bytes_per_row",
    "stochastic_round_bf16",
]
