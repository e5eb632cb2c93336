"""Which attention implementation transformers runs, so that packed samples never attend to each other.

A packed batch (data/packing.py) has no attention_mask; its position_ids restart at 0 at each sample (the
padding at the end of a row counts from 0 too, as a sample of its own). What transformers 5.24 makes of that,
per `attn_implementation`:

- sdpa and eager: masking_utils.create_causal_mask sees position_ids without an attention_mask and without a
  cache, finds the samples (find_packed_sequence_indices: a new sample wherever a position is not the previous
  one + 1) and builds a dense block-diagonal causal mask, [rows, 1, tokens, tokens], per forward pass. Exact,
  but the attention is computed, then masked, over every pair of tokens of the row.
- flex_attention: the same mask function, compiled into a BlockMask (create_block_mask), so flex_attention
  skips the blocks of tokens that belong to other samples. transformers torch.compiles flex_attention itself.
  torch's flex_attention has no backward pass on CPU (nor MPS), so it cannot train there.
- flash_attention_2: no mask at all. It runs flash_attn_varlen_func with cu_seqlens taken from position_ids,
  but only for a batch of ONE row (modeling_flash_attention_utils._is_packed_sequence); with more rows and no
  mask it runs plain causal flash over each whole row, and the samples of a row see each other. So the
  trainer passes `flash_varlen_kwargs(position_ids)` (cu_seq_lens_q/k, max_length_q/k over the flattened
  batch) with a packed batch, which takes the varlen path for any number of rows.

"No cache" matters: with config.use_cache=True the model builds a DynamicCache even in training, and
create_causal_mask then ignores position_ids, so sdpa, eager and flex let the samples see each other
(modeling.py sets use_cache=False). An unpacked batch carries attention_mask (right padding) and no
position_ids: every implementation handles it the ordinary way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kubetune_api import AttentionKernel

from ..errors import ConfigError

if TYPE_CHECKING:
    import torch

FIELD = "hyperparameters.performance.attention"
FLEX_TRAINING_DEVICES = ("cuda", "xpu", "hpu")  # torch's flex_attention has a backward pass on these only


def _flash_missing(device_type: str, dtype: torch.dtype) -> str | None:
    """Why FlashAttention 2 cannot run here, or None when it can."""
    import torch  # torch: not for kubetune validate

    if device_type != "cuda":
        return f"flash-attn needs a CUDA GPU (the device is {device_type})"
    if dtype not in (torch.bfloat16, torch.float16):
        return f"flash-attn needs bf16 or fp16 (the model computes in {str(dtype).removeprefix('torch.')})"
    try:
        import flash_attn  # noqa: F401
    except Exception:  # not installed, or built for another torch/CUDA
        return "flash-attn is not installed"
    return None


def _flex_missing(device_type: str) -> str | None:
    """Why flex_attention cannot train here, or None when it can."""
    import torch  # torch: not for kubetune validate

    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no flex_attention"
    if device_type not in FLEX_TRAINING_DEVICES:
        return f"flex_attention has no backward pass on {device_type}"
    return None


def attention_implementation(choice: AttentionKernel, device_type: str, dtype: torch.dtype) -> tuple[str, str]:
    """(the transformers `attn_implementation`, a sentence saying why) for `choice` on this device and dtype.

    auto: flash_attention_2 where usable, else flex_attention where it can train (CUDA), else sdpa. On CPU
    flex_attention can only run forward passes, so sdpa. (Measured on 2 shared CPU cores, one forward of
    attention over 2,048 tokens in 4 packed samples, 8 heads of 64: sdpa with the dense mask 121 ms;
    flex_attention compiled by inductor 41 ms, as it skips the other samples' blocks, after 13 s of
    compiling; flex_attention uncompiled, the unfused reference path, 1,150 ms, ten times slower than sdpa.)
    An explicit choice that cannot be honoured raises ConfigError.
    """
    choice = AttentionKernel(choice)
    if choice == AttentionKernel.sdpa:
        return "sdpa", f"sdpa: chosen in {FIELD}"
    flash_missing = _flash_missing(device_type, dtype)
    if choice == AttentionKernel.flash:
        if flash_missing:
            raise ConfigError(f"{FIELD} is flash, but {flash_missing}; use auto or sdpa")
        return "flash_attention_2", f"flash_attention_2: chosen in {FIELD}"
    flex_missing = _flex_missing(device_type)
    if choice == AttentionKernel.flex:
        if flex_missing:
            raise ConfigError(f"{FIELD} is flex, but {flex_missing}; use auto or sdpa")
        return "flex_attention", f"flex_attention: chosen in {FIELD}"
    if not flash_missing:
        return "flash_attention_2", "flash_attention_2 (varlen over the packed samples): flash-attn is usable"
    if not flex_missing:
        return "flex_attention", f"flex_attention (block mask of the packed samples): {flash_missing}"
    return "sdpa", f"sdpa (dense block-diagonal mask): {flash_missing}, and {flex_missing}"


def flash_varlen_kwargs(position_ids: torch.Tensor) -> dict:
    """flash_attention_2's varlen keyword arguments for a packed batch of any number of rows.

    A sample starts wherever position_ids is 0; cu_seq_lens are its start offsets in the flattened batch,
    then the batch's token count. Pass them to the model's forward with the batch (no attention_mask).
    """
    import torch  # torch: not for kubetune validate

    flat = position_ids.reshape(-1)
    starts = (flat == 0).nonzero().view(-1)
    cu_seq_lens = torch.cat([starts, starts.new_tensor([flat.numel()])]).to(torch.int32)
    max_length = int(cu_seq_lens.diff().max())
    return {"cu_seq_lens_q": cu_seq_lens, "cu_seq_lens_k": cu_seq_lens,
            "max_length_q": max_length, "max_length_k": max_length}
