"""Adapter dtype, selective activation checkpointing and FSDP2 mixed precision (modeling.load_model,
sharding.shard): each against the plain path on a tiny random Llama."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kubetune_api import Hyperparameters, MethodSpec
from kubetune_trainer.modeling import load_model

ROOT = Path(__file__).resolve().parents[2]
METHOD = MethodSpec.model_validate({"type": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}})


def make_llama(folder: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return make_llama(tmp_path_factory.mktemp("llama"))


def hp(**performance) -> Hyperparameters:
    checkpointing = performance.pop("gradient_checkpointing", False)
    return Hyperparameters.model_validate({"gradientCheckpointing": checkpointing, "seed": 0,
                                           "performance": performance})


def lora_b_random(model) -> None:
    """peft starts lora_B at zero (no gradient for lora_A): random values make every gradient count."""
    generator = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = (torch.randn(p.shape, generator=generator) * 0.1).to(p.dtype)


def loss_and_grads(model) -> tuple[float, dict[str, torch.Tensor]]:
    model.train()
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(2))
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """|got - want| / |want|, both flattened: how far a gradient computed in bf16 or sharded is from the reference."""
    return float((got.reshape(-1) - want.reshape(-1)).norm() / want.norm().clamp_min(1e-12))


def checkpointing_flags(model) -> list[bool]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m.gradient_checkpointing for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def test_selective_checkpointing_gives_the_loss_and_gradients_of_none_and_of_all(llama):
    results = {}
    for name, h in {"none": hp(), "all": hp(gradient_checkpointing=True),
                    "two": hp(gradient_checkpointing=True, checkpointLayers=2)}.items():
        model = load_model(llama, METHOD, "no", h)
        lora_b_random(model)
        results[name] = loss_and_grads(model)
        if name == "two":
            assert checkpointing_flags(model) == [True, False, True, False]
            assert model.kubetune_choices["checkpointed_layers"] == "2 of 4"
        if name == "all":  # on CPU, None means every layer
            assert model.kubetune_choices["checkpointed_layers"] == "4 of 4"
        if name == "none":
            assert model.kubetune_choices["checkpointed_layers"] == "off"
    loss, grads = results["none"]
    for name in ("all", "two"):
        other_loss, other_grads = results[name]
        assert other_loss == pytest.approx(loss, rel=1e-6)
        assert other_grads.keys() == grads.keys()
        for key in grads:
            torch.testing.assert_close(other_grads[key], grads[key], rtol=1e-5, atol=1e-6)


def test_bf16_adapter_is_bf16_and_trains_as_fp32_does_to_bf16_tolerance(llama):
    plain = load_model(llama, METHOD, "no", hp())
    assert plain.kubetune_choices["adapter_dtype"] == "fp32"
    assert {p.dtype for p in plain.parameters()} == {torch.float32}  # CPU default: unchanged
    bf16 = load_model(llama, METHOD, "no", hp(adapterDtype="bf16"))
    assert bf16.kubetune_choices["adapter_dtype"] == "bf16" and bf16.kubetune_choices["base_dtype"] == "bf16"
    trainable = [p for p in bf16.parameters() if p.requires_grad]
    assert trainable and {p.dtype for p in trainable} == {torch.bfloat16}
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    auto = load_model(llama, METHOD, "bf16", hp())  # auto under bf16 mixed precision: bf16 too
    assert {p.dtype for p in auto.parameters() if p.requires_grad} == {torch.bfloat16}
    for model in (plain, bf16):
        lora_b_random(model)
    loss, grads = loss_and_grads(plain)
    loss16, grads16 = loss_and_grads(bf16)
    assert loss16 == pytest.approx(loss, rel=2e-2)
    for key in grads:
        error = relative_error(grads16[key], grads[key])
        assert error < 5e-2, (key, error)


ADAPTERS = ("bf16", "fp32")


@pytest.mark.slow
def test_fsdp2_bf16_param_dtype_over_two_processes_gives_the_result_of_one(llama, tmp_path):
    """FSDP2 with param_dtype bf16 over gloo: a bf16 frozen base next to a bf16 or an fp32 adapter in one shard
    group (FSDP2 wants one dtype for a group's trainable parameters only) gives the loss and gradients of one
    unsharded process computing in bf16. One launch shards both adapters in turn (a launch of two processes costs
    about 12 CPU-s before its first step)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           __file__, str(llama), str(tmp_path), *ADAPTERS], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for adapter in ADAPTERS:
        model = load_model(llama, METHOD, "bf16", hp(adapterDtype=adapter))
        lora_b_random(model)
        if adapter == "fp32":  # one process: the compute FSDP's param_dtype does, bf16 weights
            model = model.to(torch.bfloat16)
        loss, grads = loss_and_grads(model)
        for rank in (0, 1):
            result = json.loads((tmp_path / f"{adapter}-{rank}.json").read_text())
            assert result["dtypes"] == [adapter]
            assert result["loss"] == pytest.approx(loss, rel=1e-2), (adapter, rank)
            for key, value in result["grads"].items():
                error = relative_error(torch.tensor(value), grads[key])
                assert error < 5e-2, (adapter, rank, key, error)


def _worker(folder: Path, out: Path, adapters: list[str]) -> None:
    from kubetune_trainer import sharding
    from torch.distributed.tensor import DTensor

    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    for adapter in adapters:
        model = load_model(folder, METHOD, "bf16", hp(adapterDtype=adapter))
        lora_b_random(model)
        model = sharding.shard(model, torch.device("cpu"), "bf16")
        loss, _ = loss_and_grads(model)
        grads = {}
        for name, p in model.named_parameters():
            if p.requires_grad:
                g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
                grads[name] = g.float().reshape(-1).tolist()
        dtypes = sorted({"bf16" if p.dtype == torch.bfloat16 else "fp32"
                         for p in model.parameters() if p.requires_grad})
        (out / f"{adapter}-{rank}.json").write_text(json.dumps({"loss": loss, "grads": grads, "dtypes": dtypes}))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:])
