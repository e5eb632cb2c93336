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


# -- what a record may name ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vit(tmp_path_factory) -> Path:
    from kubetune_dev.tiny_vision import make_tiny_vit

    return make_tiny_vit(tmp_path_factory.mktemp("vit"), image_size=32, patch_size=8, hidden_size=32, layers=2,
                         heads=2)


def _png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (40, 40, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


def _image_config(tmp_path: Path, model: Path, train: str, endpoint: str | None = None) -> TrainerConfig:
    return TrainerConfig.model_validate({
        "jobName": "paths", "task": "image-classification", "baseModel": {"uri": str(model)},
        "dataset": {"train": train}, "output": {"uri": str(tmp_path / "out")}, "metrics": {"port": 0},
        "workDir": str(tmp_path / "work"), **({"storage": {"endpoint": endpoint}} if endpoint else {})})


def _validate(config: TrainerConfig, storage: Storage | None = None):
    """`kubetune validate` as the validation Job runs it (validation.validate_only)."""
    from kubetune_trainer.validation import validate_only

    return validate_only(config, storage or Storage(config.storage))


def _records(*images: str) -> bytes:
    return "".join(json.dumps({"image": image, "label": label}) + "\n"
                   for image, label in zip(images, ["dark", "light"] * len(images), strict=False)).encode()


@pytest.mark.parametrize("evil", ["/etc/passwd", "file:///proc/self/environ", "../../../../../../etc/passwd"])
def test_a_record_naming_a_file_of_the_pod_is_refused_with_its_line(s3_server, bucket, tmp_path, vit, evil):
    """Attack: a dataset on object storage whose record names a file of the pod as its image (the pod's
    environment holds the storage credentials). Answer: validation fails (DatasetError, exit 65) naming the data
    file's URI and the line, and the file is not read."""
    from kubetune_trainer.errors import DatasetError

    client = s3_server.client()
    client.put_object(Bucket=bucket, Key="ds/images/a.png", Body=_png())
    client.put_object(Bucket=bucket, Key="ds/train.jsonl", Body=_records("images/a.png", "images/a.png"))
    client.put_object(Bucket=bucket, Key="ds/more.jsonl", Body=_records("images/a.png", evil))
    with pytest.raises(DatasetError) as refused:
        _validate(_image_config(tmp_path, vit, f"s3://{bucket}/ds/", s3_server.endpoint))
    assert (refused.value.file, refused.value.line) == (f"s3://{bucket}/ds/more.jsonl", 2)
    if evil.startswith("/") or evil.startswith("file:"):  # a relative path climbs the bucket: refused as such
        assert f"image {evil!r} is outside the dataset's folder" in refused.value.message
    else:
        assert f"image {evil!r} points above the bucket" in refused.value.message


def test_a_label_studio_local_files_url_onto_a_file_of_the_pod_is_refused(tmp_path, vit):
    """Attack: a Label Studio export whose task names /data/local-files/?d=/etc/passwd. Answer: refused naming
    the export and the task's place in it."""
    from kubetune_trainer.errors import DatasetError

    folder = tmp_path / "ds"
    (folder / "images").mkdir(parents=True)
    (folder / "images" / "a.png").write_bytes(_png())
    tasks = [{"id": i, "data": {"image": image}, "annotations": [{"id": i, "result": [
        {"type": "choices", "from_name": "c", "to_name": "image", "value": {"choices": [label]}}]}]}
        for i, (image, label) in enumerate([("/data/local-files/?d=images/a.png", "dark"),
                                            ("/data/local-files/?d=/etc/passwd", "light")], start=1)]
    export = folder / "export.json"
    export.write_text(json.dumps(tasks))
    config = _image_config(tmp_path, vit, str(export))
    with pytest.raises(DatasetError, match=rf"{export}:2: .*image '/etc/passwd' is outside the dataset's folder"):
        _validate(config)


def test_a_local_split_may_name_only_images_inside_its_folder(tmp_path, vit):
    """Attack: a local (kubetune run) or pvc:// dataset with a relative path that climbs out, an absolute path, or
    a link inside the folder that points at /etc/passwd. Answer: each is refused naming its line; images inside
    the folder (relative, or absolute under it) are read."""
    from kubetune_trainer.errors import DatasetError

    folder = tmp_path / "ds"
    (folder / "images").mkdir(parents=True)
    (folder / "images" / "a.png").write_bytes(_png())
    (folder / "images" / "link.png").symlink_to("/etc/passwd")
    (tmp_path / "outside.png").write_bytes(_png())
    train = folder / "train.jsonl"
    good = ["images/a.png", str(folder / "images" / "a.png"), f"file://{folder}/images/a.png"]
    train.write_bytes(_records(*good))
    reports, _ = _validate(_image_config(tmp_path, vit, str(train)))
    assert reports["train"].samples == 3
    for evil in ("../outside.png", str(tmp_path / "outside.png"), "images/link.png", "file://etc/passwd"):
        train.write_bytes(_records("images/a.png", "images/a.png", evil))
        with pytest.raises(DatasetError, match=rf"{train}:3: image '{evil}' is outside the dataset's folder"):
            _validate(_image_config(tmp_path, vit, str(train)))


def test_a_link_in_an_image_folder_that_points_out_is_refused(tmp_path, vit):
    """Attack: an image folder (<label>/<image>) on a local or pvc:// volume whose "image" is a link to a file of
    the pod. Answer: refused naming the image, as a record naming the file would be."""
    from kubetune_trainer.errors import DatasetError

    folder = tmp_path / "folder"
    for label in ("dark", "light"):
        (folder / label).mkdir(parents=True)
        (folder / label / "a.png").write_bytes(_png())
    (folder / "light" / "b.png").symlink_to("/etc/passwd")
    with pytest.raises(DatasetError, match=rf"{folder}/light/b\.png: image '{folder}/light/b\.png' is outside "
                                           "the dataset's folder"):
        _validate(_image_config(tmp_path, vit, f"{folder}/"))
    (folder / "light" / "b.png").unlink()
    assert _validate(_image_config(tmp_path, vit, f"{folder}/"))[0]["train"].samples == 2


def test_a_pvc_split_may_name_images_anywhere_on_its_volume_only(monkeypatch, tmp_path, vit):
    """A pvc:// split's records may name images on the same volume (absolute paths under its mount, or relative
    ones); a path onto another claim's volume is refused, naming the claim the split is on."""
    from kubetune_trainer.errors import DatasetError

    monkeypatch.setenv("KUBETUNE_PVC_ROOT", str(tmp_path / "pvc"))
    mine, theirs = tmp_path / "pvc" / "mine", tmp_path / "pvc" / "theirs"
    for claim in (mine, theirs):
        (claim / "images").mkdir(parents=True)
        (claim / "images" / "a.png").write_bytes(_png())
    (mine / "data").mkdir()
    (mine / "data" / "train.jsonl").write_bytes(_records("../images/a.png", str(mine / "images" / "a.png")))
    config = _image_config(tmp_path, vit, "pvc://mine/data/train.jsonl")
    assert _validate(config)[0]["train"].samples == 2
    (mine / "data" / "train.jsonl").write_bytes(_records("../images/a.png", "../../theirs/images/a.png"))
    with pytest.raises(DatasetError, match=r"train\.jsonl:2: image '\.\./\.\./theirs/images/a\.png' is outside "
                                           r"the dataset's folder pvc://mine/"):
        _validate(config)


def test_a_dataset_prefix_holding_a_key_with_dotdot_is_refused(s3_server, bucket, tmp_path, vit):
    """Attack: the dataset prefix holds an object whose key climbs out (ds/../../work/x.png: S3 keeps it as it
    is). Answer: the fetch is refused naming the key, before any record is read; nothing is written outside the
    split's download folder. A record naming an s3:// image with '..' in its key is cached under the hash of its
    URI (tests/trainer/test_storage.py)."""
    client = s3_server.client()
    client.put_object(Bucket=bucket, Key="ds/train.jsonl", Body=_records("a.png"))
    client.put_object(Bucket=bucket, Key="ds/../../../escape.png", Body=_png())
    with pytest.raises(ConfigError, match=r"refusing object name '\.\./\.\./\.\./escape\.png'"):
        _validate(_image_config(tmp_path, vit, f"s3://{bucket}/ds/", s3_server.endpoint))
    assert not list(tmp_path.rglob("escape.png"))
