"""No path from data or object keys escapes its folder, and nothing executable comes from storage (issue 27.2).

The attacker controls what lies in object storage or in a dataset (a model prefix someone else can write, a shared
dataset) but not the spec. Each test puts the attack on this project's own S3 server (kubetune_dev.s3server) or on
local disk and checks the trainer's answer: a refusal that names what to change, and nothing written or run.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
from kubetune_api import StorageEndpoint, TrainerConfig
from kubetune_trainer.errors import ConfigError
from kubetune_trainer.fetch import fetch, fetch_model
from kubetune_trainer.storage import Storage

# -- weights in pickle-based formats --------------------------------------------------------------------------


class _Payload:
    """A pickle that, when loaded, writes a marker file: what a planted pytorch_model.bin could do instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def planted_pickle(marker: Path) -> bytes:
    return pickle.dumps(_Payload(marker))


def storage_of(s3_server) -> Storage:
    return Storage(StorageEndpoint(endpoint=s3_server.endpoint))


def test_a_model_prefix_with_only_pickle_weights_is_refused_naming_the_opt_in(s3_server, bucket, tmp_path):
    """Attack: a model prefix whose weights are a pytorch_model.bin (a pickle, which runs code when loaded).
    Answer: the fetch is refused before any download, naming baseModel.allowPickleWeights; no pickle reaches the
    pod's disk, and nothing runs."""
    client, marker = s3_server.client(), tmp_path / "ran"
    client.put_object(Bucket=bucket, Key="model/config.json", Body=b"{}")
    client.put_object(Bucket=bucket, Key="model/pytorch_model.bin", Body=planted_pickle(marker))
    dest = tmp_path / "model"
    for weights in (True, False):  # training, and the validation Job (which fetches no weights) alike
        with pytest.raises(ConfigError, match=r"pytorch_model\.bin.*set baseModel\.allowPickleWeights: true"):
            fetch_model(storage_of(s3_server), f"s3://{bucket}/model/", dest, weights=weights)
    assert not list(tmp_path.rglob("*.bin")) and not marker.exists()


def test_the_opt_in_downloads_pickle_weights(s3_server, bucket, tmp_path):
    """With baseModel.allowPickleWeights: true the author has said they trust the folder: its .bin is fetched."""
    client = s3_server.client()
    client.put_object(Bucket=bucket, Key="model/config.json", Body=b"{}")
    client.put_object(Bucket=bucket, Key="model/pytorch_model.bin", Body=b"weights")
    dest = fetch_model(storage_of(s3_server), f"s3://{bucket}/model/", tmp_path / "model", allow_pickle=True)
    assert (dest / "pytorch_model.bin").read_bytes() == b"weights"


def test_pickle_files_beside_safetensors_weights_are_not_downloaded(s3_server, bucket, tmp_path):
    """Attack: next to good safetensors weights, a planted optimizer.pt, a training_args.bin and an evil.pth
    (a .pth in a site folder runs code in every Python process). Answer: the safetensors are fetched, the
    pickle-based files are left in the bucket."""
    client = s3_server.client()
    for key, body in {"config.json": b"{}", "model.safetensors": b"st", "training_args.bin": b"p",
                      "optimizer.pt": b"p", "sub/evil.pth": b"import os", "data.pkl": b"p"}.items():
        client.put_object(Bucket=bucket, Key=f"model/{key}", Body=body)
    dest = fetch_model(storage_of(s3_server), f"s3://{bucket}/model/", tmp_path / "model")
    assert sorted(p.name for p in dest.rglob("*") if p.is_file()) == ["config.json", "model.safetensors"]


def test_a_local_model_folder_with_only_pickle_weights_is_refused(tmp_path):
    """The same refusal for a pvc:// or local model folder, where nothing is downloaded."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model-00001-of-00002.bin").write_bytes(b"p")
    with pytest.raises(ConfigError, match="allowPickleWeights"):
        fetch_model(Storage(), str(folder), tmp_path / "unused")
    assert fetch_model(Storage(), str(folder), tmp_path / "unused", allow_pickle=True) == folder


def test_hf_downloads_skip_pickle_weights(monkeypatch, tmp_path):
    """hf:// repositories often hold pytorch_model.bin beside model.safetensors: the download skips *.bin, *.pt,
    *.pth and *.pkl unless the spec opts in, and a repository with no safetensors weights is refused naming the
    field. (The Hub is not reachable from the tests: huggingface_hub's snapshot_download is replaced by a fake
    that records its patterns.)"""
    import huggingface_hub

    calls = []

    def snapshot_download(repo_id, revision=None, allow_patterns=None, ignore_patterns=None):
        calls.append(ignore_patterns)
        folder = tmp_path / repo_id
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text("{}")
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    with pytest.raises(ConfigError, match=r"no \.safetensors weights.*set baseModel\.allowPickleWeights: true"):
        fetch_model(Storage(), "hf://org/bin-only", tmp_path / "unused")
    assert calls[-1] == ["*.bin", "*.pt", "*.pth", "*.pkl"]
    (tmp_path / "org" / "good" / "model.safetensors").parent.mkdir(parents=True)
    (tmp_path / "org" / "good" / "model.safetensors").write_bytes(b"st")
    fetch_model(Storage(), "hf://org/good", tmp_path / "unused")
    fetch_model(Storage(), "hf://org/bin-only", tmp_path / "unused", allow_pickle=True)
    assert calls[-1] is None


def _bin_only_model(folder: Path) -> Path:
    """A tiny Llama saved as pytorch_model.bin (torch.save), without safetensors."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    model = LlamaForCausalLM(config)
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return folder


def _config(model: Path, tmp_path: Path, **base_model) -> TrainerConfig:
    return TrainerConfig(job_name="pickle", base_model={"uri": str(model), **base_model},
                         dataset={"train": str(tmp_path / "train.jsonl")}, output={"uri": str(tmp_path / "out")},
                         work_dir=str(tmp_path / "work"))


def test_the_trainer_loads_only_safetensors_unless_the_spec_opts_in(tmp_path):
    """Even a model folder that reached the trainer some other way (a cached work dir) is loaded with
    use_safetensors=True: its pytorch_model.bin is not unpickled. With the opt-in it loads, and fetch() threads
    the spec's field through."""
    import torch
    from kubetune_trainer.tasks import task_for

    model = _bin_only_model(tmp_path / "model")
    (tmp_path / "train.jsonl").write_text(json.dumps({"text": "hi"}) + "\n")
    config = _config(model, tmp_path)
    with pytest.raises(ConfigError, match="allowPickleWeights"):
        fetch(config, Storage())
    task = task_for(config, model)
    assert task.weight_formats == {"use_safetensors": True}
    with pytest.raises(OSError, match="safetensors"):
        task.load_base(torch.float32)

    opted = _config(model, tmp_path, allowPickleWeights=True)
    assert fetch(opted, Storage()).model_dir == model
    assert task_for(opted, model).load_base(torch.float32).config.num_hidden_layers == 1

