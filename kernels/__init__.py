"""expertplane.kernels: the worker-side MoE library.

- :mod:`routing`: router top-k, DeepSeek-V3 group-limited routing, selection bias.
- :mod:`replica_choice`: which replica of a logical expert serves each token (shared with the
  planner's topology evaluator).
- :mod:`dispatch`: permute, all_to_all dispatch with variable splits, combine.
- :mod:`experts`: local expert weights and the SwiGLU grouped GEMM.
- :mod:`moe`: :class:`~expertplane.kernels.moe.EPMoELayer` and
  :class:`~expertplane.kernels.moe.LayerPlacement`.
- :mod:`balancing`: selection-bias update rules and per-slot capacity (drop / next-best).
- :mod:`counters`: device-side per-slot token counters read without stalling the stream.
- :mod:`triton_ops`: Triton combine/SwiGLU/histogram/grouped-GEMM kernels, torch fallbacks.
- :mod:`reference`: dense single-process reference.
"""
