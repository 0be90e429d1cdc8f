"""Autoregressive image and video models trained here: tokenizer, sequence formats, model, trainer."""
