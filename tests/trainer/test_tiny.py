"""The tiny base model and the demo datasets: built locally, reloadable, deterministic."""

import json

import torch
from kubetune_dev import demo_data
from kubetune_dev.tiny import llama3_8b_config, make_tiny_base
from transformers import AutoModelForCausalLM, AutoTokenizer


def test_tiny_base_reloads_with_auto_classes(tmp_path):
    texts = demo_data.generic_texts(200) + demo_data.chat_texts(demo_data.support_records(50))
    path = make_tiny_base(tmp_path / "base", texts, vocab_size=512, hidden_size=32, layers=1, heads=2,
                          pretrain_steps=3)
    assert {"config.json", "model.safetensors", "generation_config.json"} <= {p.name for p in path.iterdir()}
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.model_type == "llama" and model.config.vocab_size == len(tokenizer)
    assert tokenizer.pad_token_id is not None and tokenizer.eos_token_id is not None
    prompt = tokenizer.apply_chat_template(demo_data.held_out_messages(), add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]
    with torch.no_grad():  # the weights on disk are the ones it was built with (no silent re-init)
        again = AutoModelForCausalLM.from_pretrained(path)
        x = prompt["input_ids"]
        assert torch.equal(model(x).logits, again(x).logits)


def test_support_dataset_is_deterministic_and_valid(tmp_path):
    a = demo_data.write_support_dataset(tmp_path / "a", train=40, validation=8, test=8, seed=3)
    b = demo_data.write_support_dataset(tmp_path / "b", train=40, validation=8, test=8, seed=3)
    assert set(a) == {"train", "validation", "test"}
    for split in a:
        assert a[split].read_bytes() == b[split].read_bytes()
        records = [json.loads(line) for line in a[split].read_text().splitlines()]
        assert len(records) == {"train": 40, "validation": 8, "test": 8}[split]
        for r in records:
            assert [m["role"] for m in r["messages"]] == ["system", "user", "assistant"]
            assert all(isinstance(m["content"], str) and m["content"] for m in r["messages"])
            assert r["messages"][2]["content"].endswith("- Kubi, Kubetune Support")
    everything = " ".join(p.read_text() for p in a.values())
    assert demo_data.HELD_OUT_PROMPT not in everything and "Quasar order 4817" not in everything


def test_other_demo_data_is_deterministic(tmp_path):
    assert demo_data.generic_texts(20, seed=1) == demo_data.generic_texts(20, seed=1)
    path = demo_data.write_benchmark_dataset(tmp_path, n=300)
    assert path.read_bytes() == demo_data.write_benchmark_dataset(tmp_path / "again", n=300).read_bytes()
    lengths = [len(json.loads(line)["text"].split()) for line in path.read_text().splitlines()]
    assert len(lengths) == 300 and min(lengths) < 24 and max(lengths) > 250  # widely spread lengths
    assert json.loads(demo_data.write_pretraining_text(tmp_path, n=5).read_text().splitlines()[0])["text"]


def test_llama3_8b_shape():
    config = llama3_8b_config()
    assert (config.hidden_size, config.num_hidden_layers, config.num_key_value_heads) == (4096, 32, 8)
    assert config.vocab_size == 128256 and llama3_8b_config(num_hidden_layers=2).num_hidden_layers == 2
