"""Tiny vision base models built from a config, for the image-classification example and the tests (no download).

`make_tiny_vit` and `make_tiny_resnet` save an ordinary Hugging Face model folder: a config, random weights (the
seed decides them) and an image processor config, so `AutoImageProcessor` and `AutoModelForImageClassification`
load it like google/vit-base-patch16-224 or microsoft/resnet-50. Without `labels` the folder holds the bare
backbone (ViTModel, ResNetModel), as a pretrained base without a head; with `labels` it has a classification head
for those classes (a base "with another head", which fine-tuning replaces).
"""

from __future__ import annotations

from pathlib import Path

import torch


def _head(labels: list[str] | None) -> dict:
    if not labels:
        return {}
    return {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
            "label2id": {label: i for i, label in enumerate(labels)}}


def _save(model, processor, out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    return out_dir


def make_tiny_vit(out_dir: Path, labels: list[str] | None = None, *, image_size: int = 32, patch_size: int = 8,
                  hidden_size: int = 64, layers: int = 2, heads: int = 4, seed: int = 0) -> Path:
    """Save a tiny ViT (randomly initialised) with a ViTImageProcessor resizing to image_size; return the folder."""
    from transformers import ViTConfig, ViTForImageClassification, ViTModel
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    config = ViTConfig(image_size=image_size, patch_size=patch_size, hidden_size=hidden_size,
                       num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=hidden_size * 4,
                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **_head(labels))
    torch.manual_seed(seed)
    model = ViTForImageClassification(config) if labels else ViTModel(config, add_pooling_layer=False)
    processor = _quiet("ViTImageProcessor", size={"height": image_size, "width": image_size},
                       image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return _save(model, processor, out_dir)


def make_tiny_resnet(out_dir: Path, labels: list[str] | None = None, *, image_size: int = 32,
                     hidden_sizes: tuple[int, ...] = (16, 32), depths: tuple[int, ...] = (1, 1),
                     seed: int = 0) -> Path:
    """Save a tiny ResNet (basic blocks, randomly initialised) with a ConvNextImageProcessor (the processor
    microsoft/resnet-* ship) resizing to image_size; return the folder."""
    from transformers import ResNetConfig, ResNetForImageClassification, ResNetModel
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    config = ResNetConfig(embedding_size=hidden_sizes[0], hidden_sizes=list(hidden_sizes), depths=list(depths),
                          layer_type="basic", downsample_in_first_stage=False, **_head(labels))
    torch.manual_seed(seed)
    model = ResNetForImageClassification(config) if labels else ResNetModel(config)
    # Below 384 ConvNext's processor resizes the shorter edge to shortest_edge / crop_pct and centre-crops a square.
    processor = _quiet("ConvNextImageProcessor", size={"shortest_edge": image_size}, crop_pct=1.0)
    return _save(model, processor, out_dir)


def _quiet(name: str, **kwargs):
    """The image processor class `name` of transformers, made with kwargs. Without torchvision transformers falls
    back to the PIL processors (which save the same config), with a warning that is not the user's business."""
    import transformers
    from kubetune_trainer.modeling import quiet_transformers

    with quiet_transformers():
        return getattr(transformers, name)(**kwargs)
