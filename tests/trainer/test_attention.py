"""kernels/attention.py: in a packed batch no sample attends to another under eager, sdpa, flex_attention and
(on CUDA with flash-attn) flash_attention_2; flex and sdpa agree; the implementation choice and its errors."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from kubetune_api import AttentionKernel
from kubetune_trainer.errors import ConfigError
from kubetune_trainer.kernels.attention import FIELD, attention_implementation, flash_varlen_kwargs

VOCAB = 64
# Two packed rows of 16 tokens: samples of 5, 7 and 4 tokens; samples of 6 and 6, then 4 of padding (which
# counts from 0, as a sample of its own, like data/packing.py's collate).
ROWS = [[5, 7, 4], [6, 6, 4]]
CUDA = torch.cuda.is_available()


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, use_cache=False)
    return LlamaForCausalLM(config).float()


def packed_batch(device="cpu"):
    torch.manual_seed(1)
    input_ids = torch.randint(0, VOCAB, (len(ROWS), sum(ROWS[0])), device=device)
    position_ids = torch.tensor([[p for n in row for p in range(n)] for row in ROWS], device=device)
    return {"input_ids": input_ids, "position_ids": position_ids}


@pytest.fixture
def uncompiled_flex(monkeypatch):
    """flex_attention without torch.compile (transformers compiles it and its BlockMask: a minute on CPU).
    The masks and the reference flex_attention computation stay the same."""
    import torch.nn.attention.flex_attention as flex
    import transformers.integrations.flex_attention as hf_flex
    import transformers.masking_utils as masking

    create = masking.create_block_mask
    monkeypatch.setattr(masking, "create_block_mask", lambda *a, _compile=False, **k: create(*a, **k))
    monkeypatch.setattr(hf_flex, "compile_friendly_flex_attention",
                        lambda q, k, v, training=False, **kw: flex.flex_attention(q, k, v, **kw))
    monkeypatch.setattr(flex, "_FLEX_ATTENTION_DISABLE_COMPILE_DEBUG", True)


def assert_samples_independent(model, batch, atol, **kwargs):
    with torch.no_grad():
        packed = model(**batch, **kwargs).logits
        for r, row in enumerate(ROWS):
            start = 0
            for n in row:
                alone = model(input_ids=batch["input_ids"][r:r + 1, start:start + n]).logits
                torch.testing.assert_close(packed[r:r + 1, start:start + n], alone, atol=atol, rtol=0)
                start += n


@pytest.mark.parametrize("implementation", ["eager", "sdpa", "flex_attention"])
def test_packed_samples_never_attend_to_each_other(implementation, uncompiled_flex):
    model = tiny_llama()
    model.set_attn_implementation(implementation)
    assert model.config._attn_implementation == implementation
    assert_samples_independent(model, packed_batch(), atol=1e-5)


def test_with_a_cache_the_packing_is_lost():
    """Why the trainer sets use_cache=False: with a cache transformers ignores the position_ids' samples."""
    model = tiny_llama()
    model.set_attn_implementation("sdpa")
    with pytest.raises(AssertionError):
        assert_samples_independent(model, packed_batch(), atol=1e-5, use_cache=True)


def test_flex_logits_equal_sdpa(uncompiled_flex):
    model, batch = tiny_llama(), packed_batch()
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        sdpa = model(**batch).logits
        model.set_attn_implementation("flex_attention")
        flex = model(**batch).logits
    torch.testing.assert_close(flex, sdpa, atol=1e-5, rtol=0)


@pytest.mark.skipif(not CUDA, reason="flex_attention has no backward pass on CPU")
def test_flex_logits_and_gradients_equal_sdpa():
    model, batch = tiny_llama().cuda(), packed_batch("cuda")
    batch["labels"] = batch["input_ids"]
    results = {}
    for implementation in ("sdpa", "flex_attention"):
        model.set_attn_implementation(implementation)
        model.zero_grad()
        out = model(**batch)
        out.loss.backward()
        results[implementation] = (out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(results["flex_attention"][0], results["sdpa"][0], atol=1e-5, rtol=0)
    for name, grad in results["sdpa"][1].items():
        torch.testing.assert_close(results["flex_attention"][1][name], grad, atol=1e-5, rtol=0, msg=name)


def test_flash_varlen_kwargs_cover_every_sample_of_every_row():
    kwargs = flash_varlen_kwargs(packed_batch()["position_ids"])
    assert kwargs["cu_seq_lens_q"].tolist() == [0, 5, 12, 16, 22, 28, 32]
    assert kwargs["cu_seq_lens_q"].dtype == torch.int32
    assert kwargs["cu_seq_lens_k"] is kwargs["cu_seq_lens_q"]
    assert kwargs["max_length_q"] == kwargs["max_length_k"] == 7


@pytest.mark.skipif(not (CUDA and importlib.util.find_spec("flash_attn")), reason="needs CUDA and flash-attn")
def test_flash_packed_samples_never_attend_to_each_other():
    model = tiny_llama().cuda().to(torch.bfloat16)
    model.set_attn_implementation("flash_attention_2")
    batch = packed_batch("cuda")
    assert_samples_independent(model, batch, atol=2e-2, **flash_varlen_kwargs(batch["position_ids"]))


def test_auto_on_cpu_is_sdpa():
    implementation, why = attention_implementation(AttentionKernel.auto, "cpu", torch.float32)
    assert implementation == "sdpa"
    assert why.startswith("sdpa") and "CUDA" in why and "backward" in why


def test_auto_on_cuda_without_bf16_is_flex():
    implementation, why = attention_implementation(AttentionKernel.auto, "cuda", torch.float32)
    assert implementation == "flex_attention" and "bf16" in why


def test_explicit_sdpa_is_honoured():
    assert attention_implementation(AttentionKernel.sdpa, "cuda", torch.bfloat16)[0] == "sdpa"


@pytest.mark.parametrize(("choice", "device_type", "dtype", "missing"), [
    (AttentionKernel.flash, "cpu", torch.bfloat16, "CUDA"),
    (AttentionKernel.flash, "cuda", torch.float32, "bf16"),
    (AttentionKernel.flex, "cpu", torch.float32, "backward"),
])
def test_an_explicit_choice_that_cannot_run_is_a_config_error(choice, device_type, dtype, missing):
    with pytest.raises(ConfigError) as error:
        attention_implementation(choice, device_type, dtype)
    assert FIELD in error.value.message and missing in error.value.message
    assert "use auto or sdpa" in error.value.message


class Recorder(torch.nn.Module):
    """A model that records the keyword arguments of its forward pass (kernels/loss.run_model's caller)."""

    def __init__(self, implementation: str):
        super().__init__()
        self.config = type("Config", (), {"_attn_implementation": implementation})()
        self.calls: list[dict] = []

    def forward(self, **kwargs):
        self.calls.append(kwargs)
        return kwargs


@pytest.mark.parametrize(("implementation", "varlen"), [("flash_attention_2", True), ("sdpa", False)])
def test_a_packed_batch_gets_its_sample_boundaries_under_flash_only(implementation, varlen):
    from kubetune_trainer.kernels.loss import run_model

    model, batch = Recorder(implementation), packed_batch()
    run_model(model, batch)
    [call] = model.calls
    assert ("cu_seq_lens_q" in call) is varlen and call["use_cache"] is False
    if varlen:
        assert call["cu_seq_lens_q"].tolist() == flash_varlen_kwargs(batch["position_ids"])["cu_seq_lens_q"].tolist()
    run_model(model, {"input_ids": batch["input_ids"], "attention_mask": torch.ones_like(batch["input_ids"])})
    assert "cu_seq_lens_q" not in model.calls[-1], "an unpacked batch keeps its attention_mask only"


def test_load_model_logs_its_choice_and_auto_falls_back_to_sdpa(tmp_path, monkeypatch):
    """On CPU auto is sdpa; where auto picks a kernel the model cannot load (flash-attn missing here), sdpa."""
    import kubetune_trainer.kernels.attention as attention
    from kubetune_api import Hyperparameters, MethodSpec
    from kubetune_trainer.modeling import load_model

    folder = tmp_path / "llama"
    tiny_llama().save_pretrained(folder)
    method = MethodSpec.model_validate({"type": "lora", "lora": {"r": 4, "alpha": 8}})
    model = load_model(folder, method, "no", Hyperparameters())
    assert model.config._attn_implementation == "sdpa"
    assert model.kubetune_choices["attention"].startswith("sdpa (dense block-diagonal mask)")

    monkeypatch.setattr(attention, "attention_implementation", lambda *a: ("flash_attention_2", "flash: usable"))
    model = load_model(folder, method, "no", Hyperparameters())
    assert model.config._attn_implementation == "sdpa"
    assert model.kubetune_choices["attention"] == "sdpa: the model does not implement flash_attention_2"
    explicit = Hyperparameters.model_validate({"performance": {"attention": "flash"}})
    with pytest.raises(ConfigError, match="baseModel"):  # an explicit choice is not replaced
        load_model(folder, method, "no", explicit)
