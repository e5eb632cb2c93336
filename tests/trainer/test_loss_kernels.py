"""kernels/loss.py: the chunked loss gives the plain path's loss, gradients, log-probabilities and token accuracy
to float tolerance, on LoRA and full fine-tuning (tied and untied output layers), and keeps no full logits for
the backward pass."""

from __future__ import annotations

import pytest
import torch
from kubetune_api import LossKernel
from kubetune_trainer.data import IGNORE
from kubetune_trainer.errors import ConfigError
from kubetune_trainer.kernels import loss as kernels
from kubetune_trainer.objectives.sft import targets

VOCAB = 97


def tiny_llama(tied: bool = False, **extra):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied, **extra)
    return LlamaForCausalLM(config).float()


def with_lora(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    for name, p in lora.named_parameters():  # a LoRA B of zeros would give zero gradients to every A
        if "lora_B" in name:
            p.data.normal_(0, 0.1)
    return lora


def packed_batch() -> dict[str, torch.Tensor]:
    """Two rows: packed samples (position ids restarting), prompts not trained, a padded tail."""
    g = torch.Generator().manual_seed(2)
    input_ids = torch.randint(0, VOCAB, (2, 40), generator=g)
    labels = input_ids.clone()
    labels[0, :6] = IGNORE
    labels[0, 20:25] = IGNORE
    labels[1, :3] = IGNORE
    labels[1, 33:] = IGNORE
    position_ids = torch.cat([torch.arange(20), torch.arange(20)]).repeat(2, 1)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def loss_and_grads(model, head, batch):
    model.zero_grad(set_to_none=True)
    inputs, labels, trained = targets(batch)
    loss = head.cross_entropy_sum(model, inputs, labels, trained)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Chunks of 7 positions, so a batch's 60-odd trained positions take several (and a ragged last one)."""
    monkeypatch.setattr(kernels, "CHUNK_ELEMENTS", 7 * VOCAB)


@pytest.mark.parametrize("method", ["lora", "full", "full-tied"])
def test_chunked_loss_and_gradients_equal_the_full_logits_path(method):
    model = tiny_llama(tied=method == "full-tied")
    model = with_lora(model) if method == "lora" else model
    batch = packed_batch()
    full_loss, full_grads = loss_and_grads(model, kernels.LossHead(LossKernel.full), batch)
    chunked_loss, chunked_grads = loss_and_grads(model, kernels.LossHead(LossKernel.chunked), batch)

    inputs, labels, trained = targets(batch)
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits[:, :-1]
    reference = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), batch["labels"][:, 1:].reshape(-1),
                                                  ignore_index=IGNORE, reduction="sum")
    torch.testing.assert_close(full_loss, reference, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(chunked_loss, full_loss, rtol=1e-5, atol=1e-5)
    assert full_grads.keys() == chunked_grads.keys() and len(full_grads) > 4
    for name, grad in full_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    if method != "lora":  # the output layer is trained: its gradient went through the chunks too
        assert any("lm_head" in n or "embed_tokens" in n for n in chunked_grads)


def test_evaluation_scores_and_token_accuracy_equal_the_full_logits_path():
    model = tiny_llama()
    inputs, labels, trained = targets(packed_batch())
    with torch.no_grad():
        full = kernels.LossHead(LossKernel.full).scores(model, inputs, labels, trained, correct=True)
        chunked = kernels.LossHead(LossKernel.chunked).scores(model, inputs, labels, trained, correct=True)
        logits = model(**inputs, use_cache=False).logits[:, :-1]
    torch.testing.assert_close(chunked.logps, full.logps, rtol=1e-5, atol=1e-5)
    assert torch.equal(chunked.correct, full.correct)
    assert torch.equal(full.correct, (logits.argmax(-1) == labels)[trained])
    assert chunked.logps.shape == (int(trained.sum()),)


def test_token_logps_put_each_position_back_in_place_for_the_preference_objectives():
    model = with_lora(tiny_llama())
    inputs, labels, trained = targets(packed_batch())
    per_token = kernels.LossHead(LossKernel.chunked).token_logps(model, inputs, labels, trained)
    logits = model(**inputs, use_cache=False).logits[:, :-1].float()
    expected = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(per_token, torch.where(trained, expected, 0), rtol=1e-5, atol=1e-5)


def test_a_blank_batch_still_gives_every_trainable_weight_a_gradient():
    """A process whose share of a step ran out trains a blank batch (no trained token): its backward must still
    reach every parameter, as in the other processes (DDP waits for all of them)."""
    model = tiny_llama()
    batch = packed_batch()
    batch["labels"].fill_(IGNORE)
    loss, grads = loss_and_grads(model, kernels.LossHead(LossKernel.chunked), batch)
    assert loss.item() == 0
    assert all(torch.count_nonzero(g) == 0 for g in grads.values())


def test_the_backward_pass_keeps_no_full_logits():
    """What autograd saves for the backward pass, of the tensors as wide as the vocabulary (logits): with the
    full path every position's logits; with chunks, no more than one chunk's."""
    model = with_lora(tiny_llama())
    batch = packed_batch()
    inputs, labels, trained = targets(batch)
    positions = int(trained.sum())

    def largest_saved(kernel: LossKernel) -> int:
        sizes = []

        def pack(t):
            sizes.append(t.numel() if t.dim() and t.shape[-1] == VOCAB else 0)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            kernels.LossHead(kernel).cross_entropy_sum(model, inputs, labels, trained)
        return max(sizes)

    assert largest_saved(LossKernel.full) >= positions * VOCAB
    assert largest_saved(LossKernel.chunked) <= 7 * VOCAB


def test_choice_auto_on_cpu_is_chunked_and_models_that_transform_their_logits_get_full():
    head = kernels.choose(LossKernel.auto, tiny_llama(), "cpu")
    assert head.kernel == LossKernel.chunked and "no CUDA GPU" in head.reason
    capped = tiny_llama()
    capped.config.final_logit_softcapping = 30.0
    head = kernels.choose(LossKernel.auto, capped, "cpu")
    assert head.kernel == LossKernel.full and "final_logit_softcapping" in head.reason
    with pytest.raises(ConfigError, match="hyperparameters.performance.loss: chunked cannot be used"):
        kernels.choose(LossKernel.chunked, capped, "cpu")
    with pytest.raises(ConfigError, match="hyperparameters.performance.loss: fused needs a CUDA GPU"):
        kernels.choose(LossKernel.fused, tiny_llama(), "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Liger-Kernel's fused loss runs on CUDA")
def test_fused_loss_and_gradients_equal_the_full_logits_path():
    pytest.importorskip("liger_kernel")
    model = tiny_llama().cuda()
    batch = {k: v.cuda() for k, v in packed_batch().items()}
    full_loss, full_grads = loss_and_grads(model, kernels.LossHead(LossKernel.full), batch)
    fused_loss, fused_grads = loss_and_grads(model, kernels.LossHead(LossKernel.fused), batch)
    torch.testing.assert_close(fused_loss, full_loss, rtol=1e-4, atol=1e-4)
    for name, grad in full_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)
