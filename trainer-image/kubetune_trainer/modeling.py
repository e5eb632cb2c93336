"""Load the base model and tokenizer and wrap the model for the chosen method (lora, qlora, full)."""

from __future__ import annotations

import logging
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from kubetune_api import (
    AdapterDtype,
    AttentionKernel,
    Hyperparameters,
    MethodSpec,
    MethodType,
    Precision,
)
from kubetune_api.finetunejob import FSDP_FP16, QLORA_FSDP

from .errors import ConfigError
from .kernels import attention as attention_kernels
from .kernels import layers as layer_kernels

if TYPE_CHECKING:
    import torch


def device_type() -> str:
    """The device type the trainer computes on: cuda where a GPU is visible, else cpu."""
    import torch  # torch: not for kubetune validate

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_precision(precision: Precision, fsdp: bool = False) -> str:
    """accelerate's mixed_precision value: bf16 where the GPU has it, fp16 on older GPUs (fp32 with FSDP, which
    has no sharded gradient scaler here), fp32 on CPU."""
    import torch  # torch: not for kubetune validate

    if precision == Precision.fp16 and fsdp:
        raise ConfigError(FSDP_FP16)
    if precision == Precision.auto:
        if torch.cuda.is_available():
            return "bf16" if torch.cuda.is_bf16_supported() else ("no" if fsdp else "fp16")
        return "no"
    if precision in (Precision.bf16, Precision.fp16) and not torch.cuda.is_available():
        if precision == Precision.fp16:
            raise ConfigError("hyperparameters.precision: fp16 needs a GPU; use auto, bf16 or fp32 on CPU")
    return {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}[precision.value]


def without_bitsandbytes(method: MethodType) -> None:
    """For a process that trains one run: unless the run is QLoRA, bitsandbytes is marked absent, as if it were not
    installed. Importing peft imports bitsandbytes, whose import compiles its kernels with torch.compile (torch's
    inductor included): about a CPU-second per process that only QLoRA needs. Only before transformers and peft
    are imported: they remember (lru_cache) whether it is installed."""
    if method != MethodType.qlora and not {"bitsandbytes", "peft", "transformers"} & sys.modules.keys():
        sys.modules["bitsandbytes"] = None  # `import bitsandbytes` raises ImportError; find_spec finds nothing


_torch_hidden = False  # from the transformers that load_tokenizer imports (hide_torch_from_transformers)
NO_TORCH_ADVICE = "PyTorch was not found"  # what transformers logs at its import when torch is absent


def hide_torch_from_transformers() -> bool:
    """For a process that loads a tokenizer and no model (`kubetune validate`, validation.without_torch): the
    transformers that load_tokenizer imports believes torch is not installed. Its configuration module, which
    AutoTokenizer imports, imports torch whenever it is (about 1.3 CPU-s, and as much again in what torch's import
    pulls in). Only before transformers or torch is imported; returns whether torch is hidden."""
    if {"torch", "transformers"} & sys.modules.keys():
        return False
    global _torch_hidden
    _torch_hidden = True
    logging.getLogger("transformers").addFilter(lambda record: NO_TORCH_ADVICE not in record.getMessage())
    return True


def _import_transformers() -> None:
    """transformers decides once, at its import, whether torch is installed (its is_torch_available is cached),
    and imports torch nowhere after that when it is not. So torch is marked absent for that import alone: other
    libraries (scipy's array API helpers) take whatever sys.modules holds for a module."""
    if not _torch_hidden or "transformers" in sys.modules:
        return
    sys.modules["torch"] = None  # `import torch` raises ImportError; find_spec finds nothing
    try:
        import transformers  # noqa: F401
    finally:
        del sys.modules["torch"]


def load_tokenizer(model_dir: Path, **kwargs):
    """The model folder's tokenizer; `kwargs` for from_pretrained (trust_remote_code)."""
    _import_transformers()
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, **kwargs)
    except (OSError, ValueError) as e:
        raise ConfigError(f"baseModel: cannot load a tokenizer from the model folder: {e}") from e
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def adapter_dtype(choice: AdapterDtype, mixed_precision: str) -> torch.dtype:
    """The dtype of the trainable LoRA weights (hyperparameters.performance.adapterDtype). bf16 when the run
    computes in bf16: the adapter then matches the bf16 base and peft casts nothing (AdamW on bf16 parameters, as
    torchtune's LoRA recipes do); fp32 otherwise. An explicit bf16 is honoured without bf16 mixed precision too
    (CPUs compute in bf16), but not under fp16, whose gradient scaler wants fp32 weights."""
    import torch  # torch: not for kubetune validate

    if choice == AdapterDtype.bf16:
        if mixed_precision == "fp16":
            raise ConfigError("hyperparameters.performance.adapterDtype bf16 does not go with fp16 mixed "
                              "precision; use auto or fp32, or precision bf16")
        return torch.bfloat16
    if choice == AdapterDtype.fp32:
        return torch.float32
    return torch.bfloat16 if mixed_precision == "bf16" else torch.float32


def load_model(model_dir: Path, method: MethodSpec, mixed_precision: str, hp: Hyperparameters,
               sharded: bool = False, *, auto_class=None, task_type: str = "CAUSAL_LM",
               modules_to_save: list[str] | None = None, **model_kwargs):
    """The model to train, as `hp` (hyperparameters: gradientCheckpointing, seed, performance) asks. Whatever is
    new (a classification head, the adapter) is initialised from the seed alone: the same seed gives the same
    model, in every process.

    Dtypes: full fine-tuning keeps fp32 master weights (autocast, or FSDP's param_dtype, computes in bf16/fp16).
    LoRA/QLoRA keep the frozen base in the compute dtype (bf16 also when `sharded`: FSDP2 wants one dtype for
    the trainable parameters of a shard group only) and the adapter in `adapter_dtype`.

    `auto_class` (default AutoModelForCausalLM) loads the folder with `model_kwargs` (num_labels, id2label, ...);
    with LoRA, `task_type` is peft's and `modules_to_save` (a classification head) is trained in full.

    The returned model's `kubetune_choices` (a dict of plain strings) says what was chosen, for a log line."""
    import torch  # torch: not for kubetune validate
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    seed, perf = hp.seed, hp.performance
    transformers_logging.disable_progress_bar()  # "Loading weights", "Writing model shards": not for pod logs
    auto_class = auto_class or AutoModelForCausalLM
    kwargs: dict = dict(model_kwargs)
    choices: dict = {}
    if method.type == MethodType.qlora and sharded:
        raise ConfigError(QLORA_FSDP)
    lora_dtype = adapter_dtype(perf.adapter_dtype, mixed_precision) if method.type != MethodType.full else None
    if method.type == MethodType.qlora:
        if not torch.cuda.is_available():
            raise ConfigError(
                "method.type qlora needs a CUDA GPU (bitsandbytes 4-bit); none is visible. "
                "Use method.type lora on CPU, or request GPUs with resources.gpusPerWorker"
            )
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        )
        kwargs["dtype"] = compute
    elif method.type == MethodType.lora and (mixed_precision == "bf16" or lora_dtype == torch.bfloat16):
        kwargs["dtype"] = torch.bfloat16  # the frozen base in bf16, the compute dtype
    else:
        kwargs["dtype"] = torch.float32  # full fine-tuning keeps fp32 master weights under autocast
    compute_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, kwargs["dtype"])
    model = _from_pretrained(model_dir, auto_class, perf.attention, compute_dtype, seed, kwargs, choices)
    model.config.use_cache = False
    if perf.liger:
        choices["liger"] = layer_kernels.apply_liger(model, device_type())
    choices["base_dtype"] = _dtype_name(kwargs["dtype"]) if method.type != MethodType.qlora else "nf4"

    if method.type == MethodType.full:
        if hp.gradient_checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": False})
        choices["checkpointed_layers"] = select_checkpointed_layers(model, hp, sharded)
        return _finish(model, hp, choices)

    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if method.type == MethodType.qlora:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=hp.gradient_checkpointing)
    elif hp.gradient_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
        model.enable_input_require_grads()
    choices["checkpointed_layers"] = select_checkpointed_layers(model, hp, sharded)
    lora = method.lora
    targets = lora.target_modules
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        task_type=task_type,
        modules_to_save=modules_to_save,
    )
    torch.manual_seed(seed)
    try:
        with quiet_peft():
            model = get_peft_model(model, config)
    except ValueError as e:
        raise ConfigError(f"method.lora.targetModules: {e}") from e
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(lora_dtype)
    choices["adapter_dtype"] = _dtype_name(lora_dtype)
    return _finish(model, hp, choices)


def _finish(model, hp: Hyperparameters, choices: dict):
    """The last touches (performance.compile) and the record of what was chosen."""
    if hp.performance.compile:
        choices["compile"] = layer_kernels.compile_layers(model)
    model.kubetune_choices = choices
    return model


def _from_pretrained(model_dir: Path, auto_class, attention: AttentionKernel, compute_dtype: torch.dtype,
                     seed: int, kwargs: dict, choices: dict):
    """auto_class.from_pretrained with the attention implementation of `attention` (kernels/attention.py),
    unless the caller's kwargs name one (None: a model without attention). When auto picks a kernel that this
    model's class does not implement, sdpa it is. Records the choice in `choices`."""
    import torch  # torch: not for kubetune validate

    if "attn_implementation" in kwargs:
        tries = [(kwargs.pop("attn_implementation"), "as the task needs")]
    else:
        tries = [attention_kernels.attention_implementation(attention, device_type(), compute_dtype)]
        if attention == AttentionKernel.auto and tries[0][0] != "sdpa":
            tries.append(("sdpa", f"sdpa: the model does not implement {tries[0][0]}"))
    for i, (implementation, reason) in enumerate(tries):
        torch.manual_seed(seed)  # a new head's initial weights
        try:
            with quiet_transformers():
                model = auto_class.from_pretrained(model_dir, attn_implementation=implementation, **kwargs)
        except (OSError, ValueError, ImportError) as e:
            if i + 1 < len(tries) and not isinstance(e, OSError):  # refused by the class: the next choice
                continue
            raise ConfigError(f"baseModel: cannot load the model folder: {e}") from e
        if implementation is not None:
            choices["attention"] = reason
        return model


def _dtype_name(dtype: torch.dtype) -> str:
    import torch  # torch: not for kubetune validate

    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))


# Activation bytes one decoder layer keeps for its backward pass, per token and hidden unit, at 2-byte
# activations: Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models") count
# 34 for a GPT layer with a fused attention kernel (no seq^2 scores). A checkpointed layer keeps its input only.
ACTIVATION_BYTES_PER_TOKEN_HIDDEN = 34
HEADROOM = 0.8  # of the free memory: logits, the loss, allocator fragmentation, kernels' workspaces


def checkpoint_layers_for_memory(model, hp: Hyperparameters, layers: int, sharded: bool) -> int:
    """How many of `layers` decoder layers must recompute so that the activations fit the free GPU memory.
    A simple estimate: free memory x HEADROOM, less the weights not yet on the GPU (over the processes when
    sharded) and ~4 bytes x 4 per trainable weight (fp32 gradient and AdamW's two moments, master copy), over
    ACTIVATION_BYTES_PER_TOKEN_HIDDEN x maxSeqLength x batchSize x hidden size per kept layer."""
    import os

    import torch  # torch: not for kubetune validate

    free, _ = torch.cuda.mem_get_info()
    world = int(os.environ.get("WORLD_SIZE", "1")) if sharded else 1
    weights = sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type != "cuda") / world
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) * 16 / world
    hidden = getattr(model.config, "hidden_size", None) or 0
    per_layer = ACTIVATION_BYTES_PER_TOKEN_HIDDEN * hp.max_seq_length * hp.batch_size * hidden
    budget = free * HEADROOM - weights - trainable
    if per_layer <= 0:
        return layers
    keep = max(0, int(budget // per_layer))
    return max(0, layers - keep)


def select_checkpointed_layers(model, hp: Hyperparameters, sharded: bool = False) -> str:
    """With gradient checkpointing on (every decoder layer recomputes), switch it off again for all but
    performance.checkpointLayers of them, spread evenly over the stack; None: all on CPU, as few as the free
    memory allows on CUDA. Returns what it did ("2 of 4", "off") for kubetune_choices."""
    import torch  # torch: not for kubetune validate

    layers = layer_kernels.decoder_layers(model)
    if not hp.gradient_checkpointing:
        return "off"
    if not layers:  # a model of other layers (ResNet...): transformers' own checkpointing as enabled
        return "on"
    wanted = hp.performance.checkpoint_layers
    if wanted is None:
        wanted = checkpoint_layers_for_memory(model, hp, len(layers), sharded) if torch.cuda.is_available() \
            else len(layers)
    wanted = min(wanted, len(layers))
    chosen = {i * len(layers) // wanted for i in range(wanted)} if wanted else set()
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = layer.gradient_checkpointing and i in chosen
    return f"{sum(layer.gradient_checkpointing for layer in layers)} of {len(layers)}"


@contextmanager
def quiet_transformers():
    """Loading a base model under a new head logs "Some weights ... were not initialized ... You should probably
    TRAIN this model": what fine-tuning is about to do, so not for the user's log."""
    from transformers.utils import logging as transformers_logging

    level = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(level)


@contextmanager
def quiet_peft():
    """peft reads transformers' deprecated `is_gradient_checkpointing`: a FutureWarning users can do nothing about."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        yield


def load_reference(model_dir: Path, mixed_precision: str, attention: str = "sdpa", **model_kwargs):
    """The frozen reference model of objective dpo with method full: the base model once more, for forward passes
    only, in the compute dtype (bf16 or fp16 under mixed precision; nothing of it trains, so also when sharded),
    with the policy's attention implementation."""
    import torch  # torch: not for kubetune validate
    from transformers import AutoModelForCausalLM

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)
    try:
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attention, dtype=dtype,
                                                         **model_kwargs)
    except (OSError, ValueError) as e:
        raise ConfigError(f"baseModel: cannot load the model folder: {e}") from e
    model.config.use_cache = False
    return model.eval().requires_grad_(False)


def load_adapter(base_model, folder):
    """A published LoRA adapter on its base model, for inference (`peft.PeftModel.from_pretrained`)."""
    from peft import PeftModel

    with quiet_peft():
        return PeftModel.from_pretrained(base_model, folder)


def trainable_state_dict(model) -> dict[str, torch.Tensor]:
    """What a checkpoint must keep: the adapter weights for LoRA/QLoRA, everything for full."""
    if hasattr(model, "peft_config"):
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(model)
    return model.state_dict()


def load_trainable_state_dict(model, state: dict[str, torch.Tensor]) -> None:
    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, state)
        if getattr(result, "unexpected_keys", None):
            raise ConfigError(f"checkpoint does not match the model: unexpected keys {result.unexpected_keys[:3]}")
        return
    model.load_state_dict(state)
