"""ExpertPlane for the inference engines users run (SGLang, vLLM, TensorRT-LLM).

One module per engine (load readers, plan writers, the live plugin; ``hf``: transformers MoE
models served by our own layer) plus ``plan_file``: the plan in
force, delivered to the engine's ranks as a JSON file named by ``EXPERTPLANE_PLAN_FILE``.
"""
