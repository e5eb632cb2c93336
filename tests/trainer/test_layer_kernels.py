"""kernels/layers.py: performance.compile (torch.compile per decoder layer) trains a LoRA model to the loss and
gradients of the plain layers, on CPU (this test compiles two layers with inductor: about 20 s, the reason it
exists); performance.liger is refused without CUDA and liger-kernel, and on CUDA matches the plain layers."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from kubetune_trainer.errors import ConfigError
from kubetune_trainer.modeling import load_model

from tests.trainer.test_precision import METHOD, hp, lora_b_random, loss_and_grads, make_llama

LIGER = torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_llama(tmp_path_factory.mktemp("llama"))


def compare(plain, other, rtol: float, atol: float) -> None:
    (loss, grads), (other_loss, other_grads) = plain, other
    assert other_loss == pytest.approx(loss, rel=rtol)
    assert other_grads.keys() == grads.keys()
    for key in grads:
        torch.testing.assert_close(other_grads[key], grads[key], rtol=rtol, atol=atol, msg=key)


def test_compiled_layers_give_the_loss_and_gradients_of_the_plain_ones(llama):
    plain = load_model(llama, METHOD, "no", hp())
    lora_b_random(plain)
    compiled = load_model(llama, METHOD, "no", hp(compile=True))
    lora_b_random(compiled)
    assert compiled.kubetune_choices["compile"] == "compiled: 4 LlamaDecoderLayer"
    assert "compile" not in plain.kubetune_choices
    compare(loss_and_grads(plain), loss_and_grads(compiled), rtol=1e-4, atol=1e-5)
    assert compiled.base_model.model.model.layers[0]._compiled_call_impl is not None
    assert set(compiled.state_dict()) == set(plain.state_dict()), "the adapter saves under the same names"


@pytest.mark.skipif(LIGER, reason="liger-kernel and a GPU are here")
def test_liger_without_a_gpu_or_the_package_is_a_config_error(llama):
    with pytest.raises(ConfigError) as error:
        load_model(llama, METHOD, "no", hp(liger=True))
    assert "hyperparameters.performance.liger" in error.value.message and "set it to false" in error.value.message


@pytest.mark.skipif(not LIGER, reason="needs CUDA and liger-kernel")
def test_liger_layers_give_the_loss_and_gradients_of_the_plain_ones(llama):
    def on_gpu(model):
        model.cuda()
        loss, grads = loss_and_grads(_CudaInputs(model))
        return loss, {k: v.cpu() for k, v in grads.items()}

    plain = load_model(llama, METHOD, "no", hp())
    lora_b_random(plain)
    liger = load_model(llama, METHOD, "no", hp(liger=True))
    lora_b_random(liger)
    assert liger.kubetune_choices["liger"] == "liger: RMSNorm, RoPE and SwiGLU of llama"
    compare(on_gpu(plain), on_gpu(liger), rtol=1e-4, atol=1e-5)


class _CudaInputs(torch.nn.Module):
    """Moves loss_and_grads' CPU inputs to the model's GPU."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, **kwargs):
        return self.model(**{k: v.cuda() if torch.is_tensor(v) else v for k, v in kwargs.items()})
