"""The plan: a model compiled once into steps over compacted activations, and the engine that runs it."""

from .engine import available_backends, fast_pathway_forward, get_plan, pathway_flops, register_conv_backend

__all__ = ["available_backends", "fast_pathway_forward", "get_plan", "pathway_flops", "register_conv_backend"]
