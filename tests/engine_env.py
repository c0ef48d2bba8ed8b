"""Test environment for the engines' own code (SGLang, vLLM wheels installed without GPU stacks).

The environment holds PyPI's torchvision (a CUDA build) beside the CPU torch wheel, and SGLang's
config package imports ``torchvision.transforms`` unconditionally: call
:func:`allow_torchvision_import` before importing SGLang. ``tests/site/sitecustomize.py`` already
does so in every process the tests start (spawned ranks too), just before torchvision's import.
"""

from expertplane.engines.torchvision_compat import allow_torchvision_import

__all__ = ["allow_torchvision_import", "deepseek_v3_dir"]


def deepseek_v3_dir(path, hidden: int, experts: int, dense: int) -> str:
    """Write a small DeepSeek-V3 config (``hidden`` layers, the first ``dense`` dense, ``experts``
    routed experts, 2 per token) to ``path``, the model directory SGLang's ModelConfig reads."""
    from transformers import DeepseekV3Config

    cfg = DeepseekV3Config(num_hidden_layers=hidden, n_routed_experts=experts,
                           first_k_dense_replace=dense, n_group=8 if experts % 8 == 0 else 1,
                           topk_group=1, num_experts_per_tok=2, hidden_size=64,
                           intermediate_size=128, moe_intermediate_size=32,
                           num_attention_heads=4, num_key_value_heads=4)
    cfg.architectures = ["DeepseekV3ForCausalLM"]
    cfg.save_pretrained(path)
    return str(path)
