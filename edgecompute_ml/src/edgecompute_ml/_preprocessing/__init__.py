"""Decoding and preprocessing of request media: audio (WAV, resampling, log-mel) and images
(decoding under pixel limits, resizing, normalisation)."""
