"""Load the base model and tokenizer and wrap the model for the chosen method (lora, qlora, full)."""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import ConfigError
from .spec import FSDP_FP16, QLORA_FSDP, MethodSpec, MethodType, Precision


def resolve_precision(precision: Precision, fsdp: bool = False) -> str:
    """accelerate's mixed_precision value: bf16 where the GPU has it, fp16 on older GPUs (fp32 with FSDP, which
    has no sharded gradient scaler here), fp32 on CPU."""
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


def load_tokenizer(model_dir: Path, **kwargs):
    """The model folder's tokenizer; `kwargs` for from_pretrained (trust_remote_code)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, **kwargs)
    except (OSError, ValueError) as e:
        raise ConfigError(f"baseModel: cannot load a tokenizer from the model folder: {e}") from e
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model_dir: Path, method: MethodSpec, mixed_precision: str, gradient_checkpointing: bool,
               sharded: bool = False, seed: int = 42, *, auto_class=None, task_type: str = "CAUSAL_LM",
               modules_to_save: list[str] | None = None, **model_kwargs):
    """The model to train. `sharded` (FSDP): every weight in fp32, one dtype per shard group. Whatever is new
    (a classification head, the adapter) is initialised from `seed` (hyperparameters.seed) alone: the same seed
    gives the same model, in every process.

    `auto_class` (default AutoModelForCausalLM) loads the folder with `model_kwargs` (num_labels, id2label, ...);
    with LoRA, `task_type` is peft's and `modules_to_save` (a classification head) is trained in full."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # "Loading weights", "Writing model shards": not for pod logs
    auto_class = auto_class or AutoModelForCausalLM
    kwargs: dict = {"attn_implementation": "sdpa", **model_kwargs}
    if method.type == MethodType.qlora and sharded:
        raise ConfigError(QLORA_FSDP)
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
    elif method.type == MethodType.lora and mixed_precision == "bf16" and not sharded:
        kwargs["dtype"] = torch.bfloat16  # frozen base weights in bf16; LoRA weights are made fp32 below
    else:
        kwargs["dtype"] = torch.float32  # full fine-tuning keeps fp32 master weights under autocast
    torch.manual_seed(seed)  # a new head's initial weights
    try:
        with quiet_transformers():
            model = auto_class.from_pretrained(model_dir, **kwargs)
    except (OSError, ValueError) as e:
        raise ConfigError(f"baseModel: cannot load the model folder: {e}") from e
    model.config.use_cache = False

    if method.type == MethodType.full:
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model

    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if method.type == MethodType.qlora:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
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
            p.data = p.data.float()
    return model


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


def load_reference(model_dir: Path, mixed_precision: str, sharded: bool = False, **model_kwargs):
    """The frozen reference model of objective dpo with method full: the base model once more, for forward passes
    only, in the compute dtype (bf16 or fp16 under mixed precision, unless sharded: one dtype per shard group)."""
    from transformers import AutoModelForCausalLM

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)
    try:
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa",
                                                         dtype=torch.float32 if sharded else dtype, **model_kwargs)
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
