"""Code generation: per graph, AOTAutograd joint graph → partition → Inductor or aot_eager."""
from .compile import compile_graph, compile_stats

__all__ = ["compile_graph", "compile_stats"]
