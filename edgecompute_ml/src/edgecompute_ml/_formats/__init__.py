"""Model file formats: safetensors checkpoints, GGUF files, CTranslate2 Whisper folders, and the
packed weight formats (int8, GGUF blocks) the architectures multiply with."""
