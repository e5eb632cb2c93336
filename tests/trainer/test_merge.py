"""output.merged (merge.py): the base model with the adapter folded in, published under <output>merged/ beside the
adapter and listed in the manifest; it computes what base + adapter compute, in the dtype asked for (the base's
by default); a classifier's merged model keeps its labels and its trained head."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from kubetune_api import OutputDtype, TrainerConfig
from kubetune_dev.demo_data import chat_texts, generic_texts, support_records, write_support_dataset
from kubetune_dev.tiny import make_tiny_base
from kubetune_trainer import merge as merging
from kubetune_trainer.merge import base_dtype, merge, merge_output
from kubetune_trainer.modeling import load_adapter
from kubetune_trainer.publish import save_output
from kubetune_trainer.tasks import task_for

TEXTS = ["Where is my order?", "The invoice is due on receipt.", "Reset my password, please."]
RECORDS = [{"text": "Either Party may terminate on notice.", "label": "termination"},
           {"text": "Fees are payable within 30 days.", "label": "payment"},
           {"text": "Keep it secret.", "label": "confidentiality"}]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A 2-layer Llama with random weights (fp32) and a tokenizer; nothing downloaded."""
    texts = generic_texts(100) + chat_texts(support_records(100, seed=1))
    return make_tiny_base(tmp_path_factory.mktemp("merge-base"), texts, vocab_size=512, hidden_size=64, layers=2,
                          heads=4)


def trainer_config(base_uri: str, work: Path, **sections) -> TrainerConfig:
    doc = {"jobName": "merge", "baseModel": {"uri": base_uri}, "dataset": {"train": str(work / "train.jsonl")},
           "method": {"type": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
           "output": {"uri": str(work / "out"), "merged": True}, "metrics": {"enabled": False},
           "workDir": str(work / "work")}
    for key, value in sections.items():
        doc[key] = {**doc.get(key, {}), **value} if isinstance(value, dict) else value
    return TrainerConfig.model_validate(doc)


def adapter(task, directory: Path) -> Path:
    """The published folder of a LoRA model whose trainable weights (adapters, a classifier's head) are random,
    unlike their initialisation (lora_B = 0), so that merging has something to fold in."""
    model = task.load_model("no", False)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    return save_output(model, task, directory)


def logits(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model.eval()(**batch).logits.float()


def causal_reference(base: Path, folder: Path):
    """The documented way to use an adapter: a fresh fp32 base with the adapter on it (peft)."""
    from transformers import AutoModelForCausalLM

    return load_adapter(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), folder)


# --- a whole run -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def published(s3, storage, base, tmp_path_factory):
    """A short LoRA run with output {merged: true, dtype: fp32} against the embedded S3 server, and its published
    prefix downloaded back (read_published checks every file's size and sha256 against the manifest)."""
    from kubetune_trainer.pipeline import run
    from kubetune_trainer.storage import read_published

    work = tmp_path_factory.mktemp("merge-run")
    storage.upload_dir(base, "s3://models/merge-base/")
    for split, path in write_support_dataset(work / "data", train=48, validation=8, test=8).items():
        storage.upload_file(path, f"s3://data/merge/{split}.jsonl")
    config = trainer_config(
        "s3://models/merge-base/", work,
        dataset={"train": "s3://data/merge/train.jsonl", "test": "s3://data/merge/test.jsonl"},
        hyperparameters={"maxSteps": 4, "batchSize": 4, "learningRate": 0.01, "maxSeqLength": 128, "loggingSteps": 2},
        evaluation={"baseline": False}, checkpoint={"everySteps": 100},
        output={"uri": "s3://adapters/merge-run/", "merged": True, "dtype": "fp32"},
        storage={"endpoint": s3.endpoint})
    manifest = run(config, report=lambda event: None)
    dest = work / "published"
    read_published(storage, config.output.uri, dest)
    return manifest, dest


@pytest.mark.slow
def test_run_publishes_the_merged_model_with_the_adapter(published, base):
    manifest, dest = published
    assert manifest["merged"] == {"path": "merged/", "dtype": "fp32"}
    files = {f["path"]: f for f in manifest["files"]}
    for name in ("adapter_config.json", "adapter_model.safetensors", "merged/config.json", "merged/model.safetensors",
                 "merged/generation_config.json", "merged/tokenizer.json", "merged/tokenizer_config.json",
                 "README.md", "merged/README.md"):  # the adapter's model card, and the merged model's own
        assert files[name]["size"] > 0 and len(files[name]["sha256"]) == 64, name
    assert manifest["record"]["mergedCard"] == "merged/README.md"
    assert "library_name: transformers" in (dest / "merged/README.md").read_text()
    assert json.loads((dest / "merged/config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert (dest / "merged/generation_config.json").read_text() == (base / "generation_config.json").read_text()


@pytest.mark.slow
def test_merged_model_equals_base_plus_adapter(published, base):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, dest = published
    reference = causal_reference(base, dest)
    assert any(p.abs().max() > 0 for n, p in reference.named_parameters() if "lora_B" in n)  # trained, not zero
    merged = AutoModelForCausalLM.from_pretrained(dest / "merged")
    assert {p.dtype for p in merged.parameters()} == {torch.float32}
    assert not any("lora" in n for n, _ in merged.named_parameters())
    tokenizer = AutoTokenizer.from_pretrained(dest / "merged")
    torch.testing.assert_close(logits(merged, tokenizer), logits(reference, tokenizer), atol=1e-5, rtol=1e-5)


# --- the merge itself ----------------------------------------------------------------------------------------------


def test_bf16_merge_and_shards(base, tmp_path, monkeypatch):
    """output.dtype bf16: every merged weight in bf16, close to the fp32 base + adapter; a model larger than
    MAX_SHARD_SIZE is saved in safetensors shards with their index, and loads."""
    from transformers import AutoModelForCausalLM

    task = task_for(trainer_config("hf://kubetune/tiny-llama", tmp_path, output={"dtype": "bf16"}), base)
    task.load_processor()
    folder = adapter(task, tmp_path / "output")
    monkeypatch.setattr(merging, "MAX_SHARD_SIZE", "200KB")
    assert merge_output(task, folder) == {"merged": {"path": "merged/", "dtype": "bf16"}}
    merged_dir = folder / "merged"
    assert (merged_dir / "model.safetensors.index.json").is_file() and len(list(merged_dir.glob("*.safetensors"))) > 1
    assert json.loads((merged_dir / "config.json").read_text())["dtype"] == "bfloat16"
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype="auto")
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    expected = logits(causal_reference(base, folder), task.processor)
    assert (logits(merged, task.processor) - expected).abs().max() < 0.05 * expected.abs().max()


def test_dtype_defaults_to_the_bases(base, tmp_path):
    task = task_for(trainer_config(str(base), tmp_path), base)
    task.load_processor()
    folder = adapter(task, tmp_path / "output")
    assert merge_output(task, folder) == {"merged": {"path": "merged/", "dtype": "fp32"}}  # the tiny base is fp32
    for config, dtype in [({"dtype": "bfloat16"}, OutputDtype.bf16), ({"torch_dtype": "float16"}, OutputDtype.fp16),
                          ({"dtype": "float32"}, OutputDtype.fp32), ({}, OutputDtype.fp32),
                          ({"dtype": "float8_e4m3fn"}, OutputDtype.fp32)]:
        folder = tmp_path / f"config-{len(config)}-{dtype}"
        folder.mkdir(exist_ok=True)
        (folder / "config.json").write_text(json.dumps({"model_type": "llama", **config}))
        assert base_dtype(folder) == dtype, config


def test_without_merged_nothing_is_merged(base, tmp_path):
    task = task_for(trainer_config(str(base), tmp_path, output={"merged": False}), base)
    task.load_processor()
    folder = adapter(task, tmp_path / "output")
    assert merge_output(task, folder) == {} and not (folder / "merged").exists()


def test_sequence_classifier_keeps_its_labels_and_trained_head(base, tmp_path):
    """The head is trained in full beside LoRA (modules_to_save); the merged model carries it, not the new head a
    fresh base is given, and its config.json names the classes."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    task = task_for(trainer_config(str(base), tmp_path, task="sequence-classification"), base)
    task.load_processor()
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    task.validate("train", train, "train", "auto", 1)
    folder = adapter(task, tmp_path / "output")
    merged_dir = merge(task, folder, tmp_path / "merged", OutputDtype.fp32)

    config = AutoConfig.from_pretrained(merged_dir)
    assert config.id2label == {0: "confidentiality", 1: "payment", 2: "termination"}
    assert config.label2id["payment"] == 1 and config.architectures == ["LlamaForSequenceClassification"]
    assert config.pad_token_id == task.processor.pad_token_id
    merged = AutoModelForSequenceClassification.from_pretrained(merged_dir)
    reference = load_adapter(AutoModelForSequenceClassification.from_pretrained(
        base, config=AutoConfig.from_pretrained(folder)), folder)
    torch.testing.assert_close(logits(merged, task.processor), logits(reference, task.processor), atol=1e-5,
                               rtol=1e-5)
    fresh = AutoModelForSequenceClassification.from_pretrained(base, config=config)  # the head untrained
    assert not torch.allclose(logits(fresh, task.processor), logits(merged, task.processor), atol=1e-3)


@pytest.mark.parametrize("architecture", ["vit", "resnet"])
def test_image_classifier_keeps_its_labels_and_trained_head(architecture, tmp_path):
    """A ViT (LoRA on its linear layers) and a ResNet whose 5-class head is replaced (LoRA on its convolutions):
    the merged model is base + adapter, with the image processor and the labels."""
    from kubetune_dev.tiny_vision import make_tiny_resnet, make_tiny_vit
    from transformers import AutoConfig, AutoModelForImageClassification

    if architecture == "vit":
        base = make_tiny_vit(tmp_path / "base", image_size=32, patch_size=8, hidden_size=32, layers=2, heads=2)
    else:
        base = make_tiny_resnet(tmp_path / "base", ["a", "b", "c", "d", "e"], image_size=32)
    labels = ["dark", "light", "mid"]
    task = task_for(trainer_config(str(base), tmp_path, task="image-classification", dataset={"labels": labels}),
                    base)
    task.load_processor()
    folder = adapter(task, tmp_path / "output")
    merged_dir = merge(task, folder, tmp_path / "merged", OutputDtype.fp32)

    assert (merged_dir / "preprocessor_config.json").is_file()
    assert AutoConfig.from_pretrained(merged_dir).id2label == dict(enumerate(labels))
    merged = AutoModelForImageClassification.from_pretrained(merged_dir).eval()
    reference = load_adapter(AutoModelForImageClassification.from_pretrained(
        base, config=AutoConfig.from_pretrained(folder), ignore_mismatched_sizes=True), folder).eval()
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(pixel_values=pixels).logits, reference(pixel_values=pixels).logits,
                                   atol=1e-5, rtol=1e-5)
