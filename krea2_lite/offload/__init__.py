"""Fitting the pipeline into a VRAM budget: the planner, block streaming, component swapping."""

from .planner import MemoryPlan, plan_memory

__all__ = ["MemoryPlan", "plan_memory"]
