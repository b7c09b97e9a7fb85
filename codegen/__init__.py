"""Code generation: per graph, AOTAutograd joint graph → partition → Inductor or aot_eager.
Identical layers are compiled once (``regional``); Inductor options in ``inductor_options``."""
from .compile import compile_graph, compile_stats
from .inductor_options import reorder_report, set_comm_reorder
from .regional import regional_stats, set_regional

__all__ = ["compile_graph", "compile_stats", "regional_stats", "set_regional",
           "reorder_report", "set_comm_reorder"]
