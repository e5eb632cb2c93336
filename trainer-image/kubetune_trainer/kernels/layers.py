"""Optional faster decoder layers (hyperparameters.performance.liger and .compile), off by default.

- liger: Liger-Kernel's Triton kernels for RMSNorm, RoPE and SwiGLU, swapped into the model in place
  (`_apply_liger_kernel_to_instance`, the library's own dispatch by model type). CUDA only; its losses are
  left to kernels/loss.py. Applied before the adapter wraps the model.
- compile: `torch.compile` of each decoder layer (torchtune's per-layer compile): layers of one class share
  one compiled graph, so compiling costs the first steps seconds, not minutes, and FSDP2's per-layer hooks
  stay outside the graphs.

Each returns a sentence for the `kernels` log event. Both are checked against the plain layers
(tests/trainer/test_layer_kernels.py).
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

from ..errors import ConfigError

if TYPE_CHECKING:
    import torch

FIELD = "hyperparameters.performance"


def decoder_layers(model) -> list[torch.nn.Module]:
    """The model's decoder layers (transformers marks them GradientCheckpointingLayer)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def apply_liger(model, device_type: str) -> str:
    """Swap Liger-Kernel's RMSNorm, RoPE and SwiGLU into `model` (a transformers model, before peft)."""
    if device_type != "cuda" or importlib.util.find_spec("liger_kernel") is None:
        raise ConfigError(f"{FIELD}.liger needs a CUDA GPU and the liger-kernel package; set it to false")
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    model_type = getattr(model.config, "model_type", "?")
    try:
        _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                        fused_linear_cross_entropy=False)
    except (TypeError, ValueError, NotImplementedError) as e:
        raise ConfigError(f"{FIELD}.liger: Liger-Kernel cannot patch this model ({model_type}: {e}); set it "
                          "to false") from e
    return f"liger: RMSNorm, RoPE and SwiGLU of {model_type}"


def compile_layers(model) -> str:
    """torch.compile each decoder layer in place (nn.Module.compile)."""
    layers = decoder_layers(model)
    if not layers:
        raise ConfigError(f"{FIELD}.compile: {type(model).__name__} has no decoder layers to compile; set it to "
                          "false")
    for layer in layers:
        layer.compile()
    return f"compiled: {len(layers)} {type(layers[0]).__name__}"
