"""Tiny random vision models built by the tests with transformers (nothing is downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

LABELS = ["cat", "dog", "car", "tree", "boat"]


def _randomise(model, std: float = 0.2) -> None:
    """Larger random weights than the default init, so that outputs differ enough to compare."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, std)
            elif "bias" in name:
                p.normal_(0, 0.05)


def make_vit(folder: Path, *, seed: int = 0) -> Path:
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                    image_size=32, patch_size=8, id2label=dict(enumerate(LABELS)),
                                    label2id={label: i for i, label in enumerate(LABELS)})
    model = transformers.ViTForImageClassification(config).eval()
    _randomise(model)
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": 32, "width": 32},
        "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}))
    return folder


def make_mobilenet(folder: Path, *, seed: int = 0, tf_padding: bool = True) -> Path:
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.MobileNetV2Config(depth_multiplier=0.35, image_size=64, tf_padding=tf_padding,
                                            id2label=dict(enumerate(LABELS)),
                                            label2id={label: i for i, label in enumerate(LABELS)})
    model = transformers.MobileNetV2ForImageClassification(config).eval()
    with torch.no_grad():  # He-scaled convs (outputs that depend on the input) and random batch norms
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.normal_(0, (2 / fan_in) ** 0.5)
            if isinstance(m, torch.nn.Linear):
                m.weight.normal_(0, 0.2)
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.normal_(1, 0.1)
                m.bias.normal_(0, 0.1)
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "MobileNetV2ImageProcessor", "do_resize": True, "size": {"shortest_edge": 72},
        "resample": 2, "do_center_crop": True, "crop_size": {"height": 64, "width": 64}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225]}))
    return folder


def clip_tokenizer():
    """A small byte-level BPE with CLIP's special tokens and template (<|startoftext|> $A <|endoftext|>)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    from .tiny import CORPUS

    tk = Tokenizer(models.BPE(unk_token="<|endoftext|>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|startoftext|>", "<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    texts = [*CORPUS, "this is a photo of a cat", "a photo of a dog", "a car on a road", "a tree", "a boat"]
    tk.train_from_iterator(texts * 3, trainer)
    bos, eos = tk.token_to_id("<|startoftext|>"), tk.token_to_id("<|endoftext|>")
    tk.post_processor = processors.TemplateProcessing(single="<|startoftext|> $A <|endoftext|>",
                                                      special_tokens=[("<|startoftext|>", bos), ("<|endoftext|>", eos)])
    return tk


def make_clip(folder: Path, *, seed: int = 0) -> Path:
    import torch
    import transformers

    tk = clip_tokenizer()
    torch.manual_seed(seed)
    text = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                vocab_size=tk.get_vocab_size(), max_position_embeddings=32,
                bos_token_id=tk.token_to_id("<|startoftext|>"), eos_token_id=tk.token_to_id("<|endoftext|>"),
                pad_token_id=tk.token_to_id("<|endoftext|>"))
    vision = dict(hidden_size=40, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
                  patch_size=8)
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)
    model = transformers.CLIPModel(config).eval()
    _randomise(model, 0.15)
    model.save_pretrained(folder)
    tk.save(str(folder / "tokenizer.json"))
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": 32},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": 32, "width": 32}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}))
    return folder


def make_yolos(folder: Path, *, seed: int = 0) -> Path:
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.YolosConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                      intermediate_size=64, image_size=[32, 48], patch_size=8,
                                      num_detection_tokens=6, id2label=dict(enumerate(LABELS[:3])),
                                      label2id={label: i for i, label in enumerate(LABELS[:3])})
    model = transformers.YolosForObjectDetection(config).eval()
    _randomise(model, 0.2)
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "YolosImageProcessor", "do_resize": True,
        "size": {"shortest_edge": 40, "longest_edge": 64}, "resample": 2, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225]}))
    return folder
