"""`hyperparameters.strategy: fsdp`: the model sharded over the processes with PyTorch's FSDP2 (`fully_shard`).

Each decoder layer (the classes a Hugging Face model lists in `_no_split_modules`) is one shard group, and
the whole model the root group: a process holds 1/N of every parameter, gradient and optimizer state, and
all-gathers a layer's weights just before using it. Works on GPUs (NCCL) and on CPUs (gloo).

Sharded tensors are DTensors; the functions below that gather them in full are collectives: every process
calls them, in the same order, and gets the full tensors (on CPU) back.

torch.distributed's checkpoint and tensor modules are imported by the functions that use them: importing them
costs every trainer process, sharded or not, about a CPU-second (sympy included). torch itself too: the tasks
import `is_sharded`, and `kubetune validate` imports the tasks and no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kubetune_api import Strategy

if TYPE_CHECKING:
    import torch
    from kubetune_api import TrainerConfig


def is_sharded(config: TrainerConfig, accelerator) -> bool:
    """Whether the run shards the model (strategy fsdp over several processes) rather than replicating it."""
    return config.hyperparameters.strategy == Strategy.fsdp and accelerator.num_processes > 1


def shard(model, device: torch.device, mixed_precision: str = "no"):
    """Shard `model` (each decoder layer a group, the model the root). `mixed_precision` is accelerate's value:
    with "bf16" each layer's weights are all-gathered and computed in bf16 (param_dtype; fp32 master weights of
    full fine-tuning stay fp32 in the shards) and gradients reduced in fp32; otherwise parameters compute in the
    dtype they have. FSDP2 needs one dtype for the trainable parameters of a group only: the frozen bf16 base
    of LoRA shards next to its adapter, whatever the adapter's dtype."""
    import torch  # torch: not for kubetune validate
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layer_classes = set(getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
    if not layers:
        raise ValueError(f"{type(base).__name__} names no decoder layer classes (_no_split_modules) to shard")
    param_dtype = torch.bfloat16 if mixed_precision == "bf16" else None
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def full(t: torch.Tensor) -> torch.Tensor:
    """A tensor in full: a DTensor's shards gathered (a collective), any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def full_trainable_state(model) -> dict[str, torch.Tensor]:
    """The trainable parameters in full, by their names in the unwrapped model (a collective)."""
    return {name: full(p.detach()).cpu() for name, p in model.named_parameters() if p.requires_grad}


def full_optimizer_state(model, optimizer) -> dict:
    """The optimizer state in full, keyed by parameter name (a collective; complete on rank 0 only)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                cpu_offload=True))


def load_full_weights(model, weights: dict[str, torch.Tensor]) -> None:
    """Load trainable weights saved by full_trainable_state into the sharded model (each process has them all)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))


def load_full_state(model, optimizer, weights: dict[str, torch.Tensor], optimizer_state: dict) -> None:
    """Load trainable weights and optimizer state saved by the two functions above into the sharded model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    load_full_weights(model, weights)
    set_optimizer_state_dict(model, optimizer, optimizer_state,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
