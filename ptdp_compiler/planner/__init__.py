"""Planner: cost model, schedule simulator and search (not built yet)."""
