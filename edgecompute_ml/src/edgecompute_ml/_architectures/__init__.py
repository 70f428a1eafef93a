"""Model architectures in torch: one module per family (Llama-family decoders, BERT, CLIP, ViT,
MobileNetV2, Whisper, YOLOS), each a config parsed from ``config.json`` and a model built from
its weights. Imported on first use by the store's families."""
