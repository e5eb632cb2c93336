"""image-classification: image references and folders, the CPU validation of every image, batches, the model under
a new head (LoRA and full), and one whole run on generated images whose published model is reloaded and scored."""

from __future__ import annotations

import hashlib
import io
import json
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from kubetune_api import EXIT_DATA_INVALID, DataFormat, TrainerConfig
from kubetune_dev.tiny_vision import make_tiny_resnet, make_tiny_vit
from kubetune_trainer.errors import ConfigError, DatasetError
from kubetune_trainer.fetch import fetch
from kubetune_trainer.tasks import task_for
from kubetune_trainer.tasks.classification import ClassExample
from kubetune_trainer.tasks.image_classification import ImageClassification
from PIL import Image

LABELS = ["dark", "light", "split"]


def picture(label: str, rng: np.random.Generator, size: int = 32, mode: str = "RGB") -> Image.Image:
    """An easy class to tell: a dark, a light, or a half-dark half-light noisy square."""
    level = {"dark": np.full((size, size), 0.25), "light": np.full((size, size), 0.75)}.get(label)
    if level is None:
        level = np.where(np.arange(size) < size // 2, 0.25, 0.75)[None, :].repeat(size, 0)
    pixels = np.clip(level[..., None] + rng.normal(0, 0.08, (size, size, 3)), 0, 1)
    return Image.fromarray(np.uint8(pixels * 255)).convert(mode)


def write_split(folder: Path, name: str, labels: list[str], seed: int = 0, **overrides) -> Path:
    """<folder>/<name>.jsonl with one image per label under <folder>/images/<name>/; overrides: {index: record}."""
    rng = np.random.default_rng(seed)
    (folder / "images" / name).mkdir(parents=True, exist_ok=True)
    records = []
    for i, label in enumerate(labels):
        rel = f"images/{name}/{i}.png"
        picture(label, rng).save(folder / rel)
        records.append({"image": rel, "label": label})
    for i, record in overrides.items():
        records[int(i)] = record
    path = folder / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def png_bytes(label: str = "dark", seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    picture(label, np.random.default_rng(seed)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def vit(tmp_path_factory) -> Path:
    """A tiny ViT without a head: a base a classifier is put on."""
    return make_tiny_vit(tmp_path_factory.mktemp("vit"), image_size=32, patch_size=8, hidden_size=32, layers=2,
                         heads=2)


@pytest.fixture(scope="module")
def resnet(tmp_path_factory) -> Path:
    """A tiny ResNet that already has a head, of 5 other classes."""
    return make_tiny_resnet(tmp_path_factory.mktemp("resnet"), ["a", "b", "c", "d", "e"], image_size=32)


def make_config(tmp_path: Path, model: Path | str, train: str, *, endpoint: str | None = None, **sections):
    doc = {
        "jobName": f"img-{uuid.uuid4().hex[:8]}",
        "task": "image-classification",
        "baseModel": {"uri": str(model)},
        "dataset": {"train": train},
        "method": {"type": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
        "hyperparameters": {"maxSteps": 4, "batchSize": 4, "learningRate": 1e-2, "warmupRatio": 0.0},
        "output": {"uri": str(tmp_path / "out")},
        "metrics": {"port": 0},
        "workDir": str(tmp_path / "work"),
        **({"storage": {"endpoint": endpoint}} if endpoint else {}),
    }
    for key, value in sections.items():
        doc[key] = {**doc.get(key, {}), **value} if isinstance(value, dict) else value
    return TrainerConfig.model_validate(doc)


def validated(config: TrainerConfig, storage=None) -> tuple[ImageClassification, dict]:
    """Fetch the splits as the pipeline does and validate them, train first."""
    fetched = fetch(config, storage, weights=False)
    task = task_for(config, fetched.model_dir, storage)
    reports = {}
    for split, path in fetched.splits.items():
        fmt = reports["train"].format if reports else config.dataset.format
        reports[split] = task.validate(split, path, fetched.uris[split], fmt, 1)
    task.fetched = fetched
    return task, reports


# -- where the images are --------------------------------------------------------------------------------------


def test_relative_paths_resolve_against_the_data_files_folder(tmp_path, vit):
    train = write_split(tmp_path, "train", ["dark", "light", "dark"])
    task, reports = validated(make_config(tmp_path, vit, str(train)))
    assert reports["train"].format == DataFormat.classification
    assert reports["train"].classes == {"dark": 2, "light": 1}
    assert (reports["train"].samples, reports["train"].tokens) == (3, 0)
    examples = task.examples("train", train, str(train), DataFormat.classification)
    assert [Path(e.inputs) for e in examples] == [tmp_path / f"images/train/{i}.png" for i in range(3)]
    assert [e.target for e in examples] == [0, 1, 0]
    assert task.labels == ["dark", "light"] and task.size(examples[0]) == (0, 1)


def test_s3_data_with_relative_and_s3_references_is_downloaded_once_into_the_runs_cache(tmp_path, s3, storage, vit):
    prefix = f"s3://data/refs-{uuid.uuid4().hex[:6]}"
    storage.upload_file(_png(tmp_path / "a.png", "dark"), f"{prefix}/images/a.png")
    storage.upload_file(_png(tmp_path / "b.png", "light"), f"{prefix}-elsewhere/b.png")
    records = tmp_path / "train.jsonl"
    records.write_text(json.dumps({"image": "../images/a.png", "label": "dark"}) + "\n"
                       + json.dumps({"image": f"{prefix}-elsewhere/b.png", "label": "light"}) + "\n")
    storage.upload_file(records, f"{prefix}/splits/train.jsonl")
    config = make_config(tmp_path, vit, f"{prefix}/splits/train.jsonl", endpoint=s3.endpoint)
    task, reports = validated(config, storage)
    cache = Path(config.work_dir) / config.job_name / "images" / "remote"  # each named by its URI's sha256
    uris = [f"{prefix}/images/a.png", f"{prefix}-elsewhere/b.png"]
    expected = [cache / (hashlib.sha256(uri.encode()).hexdigest() + ".png") for uri in uris]
    examples = task.examples("train", task.fetched.splits["train"], config.dataset.train, reports["train"].format)
    assert [Path(e.inputs) for e in examples] == expected
    assert [p.read_bytes() for p in expected] == [(tmp_path / name).read_bytes() for name in ("a.png", "b.png")]
    written = [p.stat().st_mtime_ns for p in expected]
    again = task_for(config, task.fetched.model_dir, storage)  # another process of the run: the cache is shared
    split = task.fetched.splits["train"]
    assert [e.inputs for e in again.examples("train", split, config.dataset.train, DataFormat.auto)] == [
        str(p) for p in expected]
    assert [p.stat().st_mtime_ns for p in expected] == written


def test_images_under_a_split_prefix_come_with_it(tmp_path, s3, storage, vit):
    prefix = f"s3://data/prefix-{uuid.uuid4().hex[:6]}/train/"
    storage.upload_file(_png(tmp_path / "x.png", "dark"), prefix + "img/x.png")
    storage.upload_file(_png(tmp_path / "y.png", "light"), prefix + "img/y.png")
    (tmp_path / "part-0.jsonl").write_text(json.dumps({"image": "img/x.png", "label": "dark"}) + "\n"
                                           + json.dumps({"image": prefix + "img/y.png", "label": "light"}) + "\n")
    storage.upload_file(tmp_path / "part-0.jsonl", prefix + "part-0.jsonl")
    config = make_config(tmp_path, vit, prefix, endpoint=s3.endpoint)
    task, _ = validated(config, storage)
    split = task.fetched.splits["train"]
    assert [Path(e.inputs) for e in task.examples("train", split, prefix, DataFormat.auto)] == [
        split / "img/x.png", split / "img/y.png"]
    assert not (Path(config.work_dir) / config.job_name / "images").exists()  # nothing downloaded twice


def test_an_image_folder_is_detected_and_labelled_by_its_folders(tmp_path, vit):
    root = tmp_path / "folder" / "train"
    for label, count in (("ok", 3), ("defect", 2)):
        for i in range(count):
            _png(root / label / f"{i}.png", "light" if label == "ok" else "dark")
    _png(root / ".trash" / "0.png", "dark")  # hidden: skipped
    (root / "ok" / ".DS_Store").write_bytes(b"\0\0")
    (root / "ok" / "notes.txt").write_text("not an image")
    (root / "LICENSE").write_text("top-level files are not images of a class")
    task, reports = validated(make_config(tmp_path, vit, str(root)))
    assert reports["train"].format == DataFormat.imagefolder
    assert reports["train"].classes == {"defect": 2, "ok": 3}
    examples = task.examples("train", root, str(root), DataFormat.imagefolder)
    assert sorted(Path(e.inputs).relative_to(root).as_posix() for e in examples) == [
        "defect/0.png", "defect/1.png", "ok/0.png", "ok/1.png", "ok/2.png"]


def test_an_image_folder_in_object_storage(tmp_path, s3, storage, vit):
    prefix = f"s3://data/folder-{uuid.uuid4().hex[:6]}/"
    for split, labels in (("train", ["cat", "dog", "dog"]), ("validation", ["cat", "dog"])):
        for i, label in enumerate(labels):
            storage.upload_file(_png(tmp_path / f"{split}{i}.png", "dark"), f"{prefix}{split}/{label}/{i}.png")
    (tmp_path / "broken.png").write_bytes(png_bytes()[:60])
    storage.upload_file(tmp_path / "broken.png", f"{prefix}validation/cat/broken.png")
    config = make_config(tmp_path, vit, prefix + "train/", endpoint=s3.endpoint,
                         dataset={"validation": prefix + "validation/", "format": "imagefolder"})
    with pytest.raises(DatasetError) as err:
        validated(config, storage)
    assert str(err.value).startswith(f"{prefix}validation/cat/broken.png: image {prefix}validation/cat/broken.png "
                                     "cannot be decoded (OSError: ")  # the object, no line


def test_csv_records_and_label_studio_exports(tmp_path, vit):
    write_split(tmp_path, "train", ["dark", "light"])
    csv_file = tmp_path / "train.csv"
    csv_file.write_text("image,label\nimages/train/0.png,dark\nimages/train/1.png,light\n")
    task, reports = validated(make_config(tmp_path, vit, str(csv_file)))
    assert reports["train"].classes == {"dark": 1, "light": 1}

    export = [{"id": 7 + i, "data": {"image": f"/data/local-files/?d=images/train/{i}.png"},
               "annotations": [{"id": 1, "result": [{"type": "choices", "from_name": "label", "to_name": "image",
                                                     "value": {"choices": [label]}}]}]}
              for i, label in enumerate(["dark", "light"])]
    (tmp_path / "export.json").write_text(json.dumps(export))
    task, reports = validated(make_config(tmp_path, vit, str(tmp_path / "export.json")))
    assert reports["train"].format == DataFormat.label_studio
    examples = task.examples("train", tmp_path / "export.json", str(tmp_path / "export.json"),
                             DataFormat.label_studio)
    assert [Path(e.inputs).name for e in examples] == ["0.png", "1.png"]


def test_parquet_with_embedded_images_as_hugging_face_datasets_export_them(tmp_path, vit):
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = [{"bytes": png_bytes("dark", 1), "path": "cat.png"}, {"bytes": png_bytes("light", 2), "path": None},
              {"bytes": png_bytes("dark", 1), "path": "same-bytes.png"}]
    pq.write_table(pa.table({"image": images, "label": ["cat", "dog", "cat"]}), tmp_path / "train.parquet")
    config = make_config(tmp_path, vit, str(tmp_path / "train.parquet"))
    task, reports = validated(config)
    assert reports["train"].classes == {"cat": 2, "dog": 1}
    paths = [Path(e.inputs) for e in task.examples("train", tmp_path / "train.parquet", str(tmp_path / "train.parquet"),
                                                   DataFormat.classification)]
    assert paths[0] == paths[2] != paths[1] and paths[0].suffix == ".png"  # written once per content
    assert paths[0].parent == Path(config.work_dir) / config.job_name / "images" / "embedded"


def test_a_hugging_face_class_label_names_the_classes_in_its_order(tmp_path, vit):
    """`datasets` keeps a ClassLabel column as integers and the class names in the Parquet schema's metadata: the
    classes are those names, in that order (what datasets' int2str and the transformers examples' id2label give).
    Integers without names stay integers, and the data report says so."""
    import datasets
    import pyarrow.parquet as pq

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["bees", "ants"])})
    rows = {"image": [{"bytes": png_bytes(c, i), "path": None} for i, c in enumerate(["dark", "light", "dark"])],
            "label": [1, 0, 1]}
    datasets.Dataset.from_dict(rows, features=features).to_parquet(tmp_path / "train.parquet")
    task, reports = validated(make_config(tmp_path, vit, str(tmp_path / "train.parquet")))
    assert task.labels == features["label"].names == ["bees", "ants"]
    assert reports["train"].classes == {"bees": 1, "ants": 2}
    assert not [w for w in reports["train"].warnings if "integers" in w]

    plain = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    datasets.Dataset.from_dict(rows, features=plain).to_parquet(tmp_path / "ints.parquet")
    task, reports = validated(make_config(tmp_path, vit, str(tmp_path / "ints.parquet")))
    assert task.labels == ["0", "1"]
    assert any("the labels are integers and the file names no classes" in w for w in reports["train"].warnings)

    rows["label"] = [1, 0, 2]
    datasets.Dataset.from_dict(rows, features=datasets.Features({
        "image": datasets.Image(), "label": datasets.Value("int64")})).to_parquet(tmp_path / "bad.parquet")
    table = pq.read_table(tmp_path / "bad.parquet")  # the names of two classes, a label of a third
    schema = table.schema.with_metadata({b"huggingface": json.dumps(
        {"info": {"features": {"label": {"names": ["bees", "ants"], "_type": "ClassLabel"}}}}).encode()})
    pq.write_table(table.cast(schema), tmp_path / "bad.parquet")
    with pytest.raises(DatasetError) as err:
        validated(make_config(tmp_path, vit, str(tmp_path / "bad.parquet")))
    assert (err.value.line, err.value.problem) == (3, "label 2 is not a class of the file's ClassLabel (2 classes: "
                                                      "0 to 1)")


def test_a_folder_of_split_folders_is_refused_with_the_fields_to_set(tmp_path, vit):
    """hymenoptera_data/{train,val,test}/{ants,bees}: as one image folder it would train the classes test, train
    and val. It is refused, naming the split folders and where each belongs."""
    root = tmp_path / "hymenoptera_data"
    for split in ("train", "val", "test"):
        for label in ("ants", "bees"):
            _png(root / split / label / "0.png", "dark" if label == "ants" else "light")
    with pytest.raises(DatasetError) as err:
        validated(make_config(tmp_path, vit, str(root) + "/"))
    error = err.value
    assert error.problem == "the folder holds split folders (test, train, val), not class folders <label>/<image>"
    assert error.hint == (f"point each split at its folder: dataset.train: {root}/train/, dataset.validation: "
                          f"{root}/val/, dataset.test: {root}/test/")
    task, reports = validated(make_config(tmp_path, vit, str(root / "train"), dataset={
        "validation": str(root / "val"), "test": str(root / "test")}))
    assert reports["train"].classes == {"ants": 1, "bees": 1}


# -- the CPU validation refuses what cannot train ----------------------------------------------------------


def test_a_corrupt_image_is_refused_with_its_record_and_key(tmp_path, vit):
    train = write_split(tmp_path, "train", ["dark", "light", "dark"])
    (tmp_path / "images/train/1.png").write_bytes(png_bytes()[:80])  # truncated
    with pytest.raises(DatasetError) as err:
        validated(make_config(tmp_path, vit, str(train)))
    assert err.value.exit_code == EXIT_DATA_INVALID
    assert (err.value.file, err.value.line) == (str(train), 2)
    assert f"image {tmp_path}/images/train/1.png cannot be decoded" in str(err.value)

    (tmp_path / "images/train/1.png").write_text("<html>not found</html>")  # not an image at all
    with pytest.raises(DatasetError, match=r"train.jsonl:2: image .*1.png cannot be decoded \(Unidentified"):
        validated(make_config(tmp_path, vit, str(train)))


def test_a_missing_image_object_is_refused_with_its_record_and_uri(tmp_path, s3, storage, vit):
    prefix = f"s3://data/missing-{uuid.uuid4().hex[:6]}"
    write_split(tmp_path, "train", ["dark", "light", "dark"])
    storage.upload_file(tmp_path / "train.jsonl", f"{prefix}/train.jsonl")
    for i in (0, 2):  # not 1
        storage.upload_file(tmp_path / f"images/train/{i}.png", f"{prefix}/images/train/{i}.png")
    config = make_config(tmp_path, vit, f"{prefix}/train.jsonl", endpoint=s3.endpoint)
    with pytest.raises(DatasetError) as err:
        validated(config, storage)
    assert str(err.value) == (f"{prefix}/train.jsonl:2: image 'images/train/1.png' not found: no object or file "
                              f"{prefix}/images/train/1.png (upload it, or fix the path (give a path relative to "
                              "the data file's folder, or an s3:// URI))")


def test_an_unknown_label_is_refused_in_the_split_that_has_it(tmp_path, vit):
    train = write_split(tmp_path, "train", ["dark", "light"])
    validation = write_split(tmp_path, "validation", ["light", "split"])
    config = make_config(tmp_path, vit, str(train), dataset={"validation": str(validation)})
    with pytest.raises(DatasetError) as err:
        validated(config)
    assert (err.value.file, err.value.line) == (str(validation), 2)
    assert "unknown label 'split'; the known labels are 'dark', 'light'" in err.value.problem

    declared = make_config(tmp_path, vit, str(train), dataset={"labels": ["dark", "split"]})
    with pytest.raises(DatasetError, match=r"train.jsonl:2: unknown label 'light'.*dataset.labels"):
        validated(declared)


def test_records_that_are_not_image_records(tmp_path, vit):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"text": "a review", "label": "good"}) + "\n")
    with pytest.raises(DatasetError, match=r"train.jsonl:1: unrecognized record keys \(label, text\); expected image"):
        validated(make_config(tmp_path, vit, str(path)))
    path.write_text(json.dumps({"image": "https://example.com/a.png", "label": "good"}) + "\n")
    with pytest.raises(DatasetError, match=r"train.jsonl:1: image 'https://example.com/a.png': only s3:// URIs"):
        validated(make_config(tmp_path, vit, str(path)))


def test_a_model_folder_without_an_image_processor(tmp_path, vit):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((vit / "config.json").read_text())
    task = ImageClassification(make_config(tmp_path, bare, "unused.jsonl"), bare)
    with pytest.raises(ConfigError, match=r"baseModel: .*bare has no image processor \(preprocessor_config.json\)"):
        task.load_processor()


# -- batches and the model ----------------------------------------------------------------------------------


@pytest.mark.parametrize("base", ["vit", "resnet"])
def test_collate_gives_pixel_values_of_the_processors_size(tmp_path, base, request):
    model = request.getfixturevalue(base)
    rng = np.random.default_rng(1)
    files = []
    for i, (mode, size) in enumerate((("RGB", 48), ("L", 20), ("RGBA", 64), ("P", 33))):
        files.append(tmp_path / f"{i}.png")
        picture("split", rng, size, mode).save(files[-1])
    task = ImageClassification(make_config(tmp_path, model, "unused.jsonl", dataset={"labels": LABELS}), model)
    task.load_processor()
    batch = task.collate([ClassExample(str(f), i % 3) for i, f in enumerate(files)])
    assert batch["pixel_values"].shape == (4, 3, 32, 32) and batch["pixel_values"].dtype == torch.float32
    assert batch["labels"].tolist() == [0, 1, 2, 0] and task.units(batch) == 4
    blank = task.blank(ClassExample(str(files[0]), 1))
    assert blank["pixel_values"].shape == (1, 3, 32, 32) and task.units(blank) == 0


def test_lora_on_a_vit_trains_the_adapters_and_the_whole_new_head(tmp_path, vit):
    task = ImageClassification(make_config(tmp_path, vit, "unused.jsonl", dataset={"labels": LABELS}), vit)
    task.load_processor()
    model = task.load_model("no", False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if "classifier" in n} == {
        "base_model.model.classifier.modules_to_save.default.weight",
        "base_model.model.classifier.modules_to_save.default.bias"}
    assert trainable - {n for n in trainable if "classifier" in n} == {n for n in trainable if "lora_" in n} != set()
    assert model.get_base_model().config.id2label == dict(enumerate(LABELS))

    rng = np.random.default_rng(0)
    examples = []
    for i in range(12):
        picture(LABELS[i % 3], rng).save(tmp_path / f"{i}.png")
        examples.append(ClassExample(str(tmp_path / f"{i}.png"), i % 3))
    batch = task.collate(examples)
    head = model.base_model.model.classifier.modules_to_save["default"].weight.detach().clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(15):
        loss, units = task.loss(model, batch)
        (loss / units).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item() / units.item())
    assert losses[-1] < losses[0] / 2
    assert not torch.equal(model.base_model.model.classifier.modules_to_save["default"].weight, head)


def test_a_resnet_with_another_head_gets_lora_on_its_convolutions_or_trains_in_full(tmp_path, resnet):
    config = make_config(tmp_path, resnet, "unused.jsonl", dataset={"labels": LABELS})
    model = ImageClassification(config, resnet).load_model("no", False)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(".convolution.lora_A." in n for n in trainable)
    assert any("classifier.modules_to_save" in n for n in trainable)
    assert model(pixel_values=torch.zeros(2, 3, 32, 32)).logits.shape == (2, 3)  # the 5-class head replaced

    full = make_config(tmp_path, resnet, "unused.jsonl", dataset={"labels": LABELS}, method={"type": "full"})
    model = ImageClassification(full, resnet).load_model("no", False)
    assert all(p.requires_grad for p in model.parameters()) and model.config.num_labels == 3

    explicit = make_config(tmp_path, resnet, "unused.jsonl", dataset={"labels": LABELS},
                           method={"lora": {"targetModules": ["nothing_like_this"]}})
    with pytest.raises(ConfigError, match="method.lora.targetModules"):
        ImageClassification(explicit, resnet).load_model("no", False)


# -- the whole pipeline ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_run_on_generated_images_beats_its_baseline_and_the_published_model_scores_as_reported(
        tmp_path, s3, storage, vit):
    from kubetune_trainer.evaluate import evaluate
    from kubetune_trainer.modeling import load_adapter
    from kubetune_trainer.pipeline import run
    from kubetune_trainer.storage import read_published
    from transformers import AutoModelForImageClassification

    prefix = f"s3://data/generated-{uuid.uuid4().hex[:6]}"
    data = tmp_path / "data"
    for n, (split, count) in enumerate((("train", 48), ("validation", 12), ("test", 24))):
        write_split(data, split, [LABELS[i % 3] for i in range(count)], seed=n)
    storage.upload_dir(data, prefix)
    config = make_config(
        tmp_path, vit, f"{prefix}/train.jsonl", endpoint=s3.endpoint,
        dataset={"validation": f"{prefix}/validation.jsonl", "test": f"{prefix}/test.jsonl"},
        method={"lora": {"r": 8, "alpha": 16}}, hyperparameters={"maxSteps": 30, "batchSize": 8},
        evaluation={"everySteps": 10, "metric": "accuracy"}, output={"uri": f"s3://adapters/{prefix[10:]}/"})
    manifest = run(config, report=lambda event: None)
    test, baseline = manifest["metrics"]["test"], manifest["metrics"]["baseline"]["test"]
    assert manifest["task"] == "image-classification" and manifest["labels"] == LABELS
    assert test["accuracy"] >= baseline["accuracy"] + 0.3 and test["accuracy"] >= 0.9

    # The published adapter on the base, scored on the test images by this test's own loop.
    published = read_published(storage, config.output.uri, tmp_path / "published")
    assert published["files"] and (tmp_path / "published" / "preprocessor_config.json").is_file()
    head = {"num_labels": 3, "id2label": dict(enumerate(LABELS)), "label2id": {k: i for i, k in enumerate(LABELS)}}
    records = [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines()]
    truth = torch.tensor([LABELS.index(r["label"]) for r in records])

    def accuracy(model) -> float:
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(tmp_path / "published")
        images = [Image.open(data / r["image"]).convert("RGB") for r in records]
        with torch.no_grad():
            logits = model.eval()(pixel_values=processor(images=images, return_tensors="pt")["pixel_values"]).logits
        return (logits.argmax(-1) == truth).float().mean().item()

    torch.manual_seed(config.hyperparameters.seed)  # the new head as the trainer initialised it
    base = AutoModelForImageClassification.from_pretrained(vit, ignore_mismatched_sizes=True, **head)
    assert accuracy(base) == pytest.approx(baseline["accuracy"])
    assert accuracy(load_adapter(base, tmp_path / "published")) == pytest.approx(test["accuracy"])

    # And the task's own evaluation of the reloaded model agrees with the manifest's loss too.
    from accelerate import Accelerator

    task = task_for(config, vit, storage)
    task.load_processor()
    task.resolve_labels(LABELS)
    examples = [ClassExample(str(data / r["image"]), LABELS.index(r["label"])) for r in records]
    torch.manual_seed(config.hyperparameters.seed)
    reloaded = load_adapter(AutoModelForImageClassification.from_pretrained(vit, ignore_mismatched_sizes=True,
                                                                            **head), tmp_path / "published")
    assert evaluate(task, reloaded, examples, "test", Accelerator(cpu=True), 8)["loss"] == pytest.approx(
        test["loss"], abs=1e-4)


def _png(path: Path, label: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(label))
    return path
