"""The log-probabilities a loss needs of its target tokens, without the model's full logits.

A causal LM's logits are [rows, tokens, vocabulary]: for an 8B Llama 3 (128,256 words) at 8 x 2048 tokens one
fp32 copy is 8 GB, more than the rest of a LoRA step's activations. Yet every loss of the trainer needs only the
log-probability of each target token (cross-entropy is minus it; DPO and ORPO sum it per sequence), and
evaluation the argmax at the same positions. So `chunked` swaps the model's output layer (lm_head), for the
one forward pass, for one that takes the hidden states of the positions asked for and computes
log_softmax(head(h))[target] a chunk of positions at a time (torchtune's chunked cross-entropy). Under autograd
each chunk is checkpointed: its logits are recomputed in the backward pass, so the logits of one chunk live at a
time, at the price of one more forward of the output layer. The swap happens inside the model's forward, so
DDP's and FSDP2's hooks see an ordinary forward and the output layer's weights are where they expect them.

Kernels (hyperparameters.performance.loss):
- full: the model's logits in full, then log_softmax: the plain path, and the reference of the tests.
- chunked: the above; pure PyTorch, on every device.
- fused: Liger-Kernel's fused linear cross-entropy (CUDA), which never writes even a chunk of logits to memory
  for the backward pass; the SFT loss only (preference objectives and evaluation use chunked).
- auto: fused on a GPU where liger-kernel is installed, else chunked.
Models that transform their logits after the output layer (Gemma 2's soft-capping, Cohere's logit scale) get
full, since the swapped layer would skip that step.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kubetune_api import LossKernel

from ..errors import ConfigError
from .attention import flash_varlen_kwargs

if TYPE_CHECKING:
    import torch

FIELD = "hyperparameters.performance.loss"
# Config attributes of models whose forward changes the logits after the output layer.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")
CHUNK_ELEMENTS = 2**26  # logits per chunk: 256 MiB in fp32 (512 positions of a 128k vocabulary)


@dataclass(frozen=True)
class TokenScores:
    """At the positions asked for, in the order of `mask.nonzero()`: the target tokens' log-probabilities
    ([N] float32, with grad in training) and, when asked for, whether the argmax was the target ([N] bool)."""

    logps: torch.Tensor
    correct: torch.Tensor | None = None


def unwrapped(model):
    """The model inside DistributedDataParallel (a PeftModel or the model itself; FSDP2 keeps the model's
    class)."""
    return getattr(model, "module", model)


def output_layer(model):
    """The output layer (lm_head) of a model, inside DDP and PEFT wrappers."""
    return unwrapped(model).get_output_embeddings()


def _transforms_logits(model) -> str | None:
    config = getattr(unwrapped(model), "config", None)
    return next((a for a in LOGIT_TRANSFORMS if getattr(config, a, None) not in (None, 1, 1.0)), None)


def _liger_loss():
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    return LigerFusedLinearCrossEntropyLoss


def choose(kernel: LossKernel, model, device_type: str) -> LossHead:
    """The loss head for `kernel` on this model and device, with the reason for the choice (for the log)."""
    import torch  # torch: not for kubetune validate

    transform = _transforms_logits(model)
    if transform:
        if kernel in (LossKernel.chunked, LossKernel.fused):
            raise ConfigError(f"{FIELD}: {kernel.value} cannot be used with this model: it changes its logits after "
                              f"the output layer ({transform}); use auto or full")
        return LossHead(LossKernel.full, f"full: the model transforms its logits ({transform})")
    fused_ok = device_type == "cuda" and importlib.util.find_spec("liger_kernel") is not None
    plain_head = isinstance(output_layer(model), torch.nn.Linear)
    if kernel == LossKernel.fused:
        if not fused_ok:
            raise ConfigError(f"{FIELD}: fused needs a CUDA GPU and the liger-kernel package; use auto or chunked")
        if not plain_head:
            raise ConfigError(f"{FIELD}: fused needs a plain linear output layer (is lm_head a LoRA target?); use "
                              "auto or chunked")
        return LossHead(LossKernel.fused, "fused: Liger-Kernel fused linear cross-entropy")
    if kernel == LossKernel.auto:
        if fused_ok and plain_head:
            return LossHead(LossKernel.fused, "fused: a GPU and liger-kernel are present")
        why = "no CUDA GPU" if device_type != "cuda" else (
            "liger-kernel is not installed" if not fused_ok else "the output layer is not a plain linear layer")
        return LossHead(LossKernel.chunked, f"chunked: {why} for the fused kernel")
    return LossHead(kernel, f"{kernel.value}: as configured")


class LossHead:
    """Scores the target tokens of a batch through the model, by one of the kernels above."""

    def __init__(self, kernel: LossKernel = LossKernel.chunked, reason: str = ""):
        self.kernel, self.reason = kernel, reason

    def scores(self, model, inputs: dict[str, torch.Tensor], targets: torch.Tensor, mask: torch.Tensor,
               correct: bool = False) -> TokenScores:
        """`targets` [R, T-1]: the token each position 0..T-2 predicts (position t predicts token t + 1);
        `mask` [R, T-1]: the positions to score."""
        if self.kernel == LossKernel.full:
            logits = run_model(model, inputs).logits[:, :-1][mask]
            return _scores(logits, targets[mask], correct)
        out = _with_head(model, inputs, lambda forward, hidden: _chunked(forward, hidden[:, :-1][mask],
                                                                         targets[mask], correct))
        return TokenScores(out[:, 0], out[:, 1].bool() if correct else None)

    def token_logps(self, model, inputs: dict[str, torch.Tensor], targets: torch.Tensor,
                    mask: torch.Tensor) -> torch.Tensor:
        """The targets' log-probabilities as [R, T-1] float32, 0 outside `mask`."""
        import torch  # torch: not for kubetune validate

        logps = self.scores(model, inputs, targets, mask).logps
        return torch.zeros(mask.shape, dtype=logps.dtype, device=logps.device).masked_scatter(mask, logps)

    def cross_entropy_sum(self, model, inputs: dict[str, torch.Tensor], targets: torch.Tensor,
                          mask: torch.Tensor) -> torch.Tensor:
        """The summed cross-entropy of the targets at `mask` (a scalar, float32)."""
        if self.kernel != LossKernel.fused:
            return -self.scores(model, inputs, targets, mask).logps.sum()
        fused = _liger_loss()(reduction="sum")

        def head(forward, hidden):
            layer = forward.__self__
            return fused(layer.weight, hidden[:, :-1][mask], targets[mask], layer.bias).float().reshape(1, 1)

        return _with_head(model, inputs, head).reshape(())


def run_model(model, inputs: dict[str, torch.Tensor]):
    """The model's forward pass over a batch. Under flash_attention_2 a packed batch (position_ids, no
    attention_mask) also gets the varlen boundaries of its samples: transformers finds them itself for one row
    only, and with more rows the samples of a row would attend to each other (kernels/attention.py)."""
    config = getattr(unwrapped(model), "config", None)
    if "position_ids" in inputs and getattr(config, "_attn_implementation", None) == "flash_attention_2":
        inputs = {**inputs, **flash_varlen_kwargs(inputs["position_ids"])}
    return model(**inputs, use_cache=False)


def _with_head(model, inputs: dict[str, torch.Tensor], compute) -> torch.Tensor:
    """Run the model with its output layer replaced, for this call, by `compute(original forward, hidden
    states)`; what `compute` returns comes back as the output's logits (reshaped to [N, k])."""
    layer = output_layer(model)
    forward = layer.forward
    previous = layer.__dict__.get("forward")
    layer.forward = lambda hidden: compute(forward, hidden).unsqueeze(0)
    try:
        out = run_model(model, inputs).logits
    finally:
        if previous is None:
            del layer.forward
        else:
            layer.forward = previous
    return out.reshape(out.shape[-2], out.shape[-1])


def _scores(logits: torch.Tensor, targets: torch.Tensor, correct: bool) -> TokenScores:
    logits = logits.float()
    logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    return TokenScores(logps, (logits.argmax(-1) == targets) if correct else None)


def _chunk(forward, hidden: torch.Tensor, targets: torch.Tensor, correct: bool) -> torch.Tensor:
    """Each position's target log-probability, [n, 1], or with `correct` also whether the argmax was the
    target, [n, 2], from one chunk."""
    import torch  # torch: not for kubetune validate

    scores = _scores(forward(hidden), targets, correct)
    if not correct:
        return scores.logps.unsqueeze(-1)
    return torch.stack([scores.logps, scores.correct.float()], dim=-1)


def _chunked(forward, hidden: torch.Tensor, targets: torch.Tensor, correct: bool) -> torch.Tensor:
    import torch  # torch: not for kubetune validate
    from torch.utils.checkpoint import checkpoint

    vocabulary = forward.__self__.weight.shape[0]  # the output layer's (a peft LoRA layer's is its base's)
    size = max(64, CHUNK_ELEMENTS // max(vocabulary, 1))
    if hidden.shape[0] == 0:  # a blank batch: still a graph through the layer, so every process's backward agrees
        return _chunk(forward, hidden, targets, correct)
    recompute = torch.is_grad_enabled()
    parts = [
        checkpoint(_chunk, forward, hidden[i:i + size], targets[i:i + size], correct, use_reentrant=False)
        if recompute else _chunk(forward, hidden[i:i + size], targets[i:i + size], correct)
        for i in range(0, hidden.shape[0], size)
    ]
    return torch.cat(parts)
