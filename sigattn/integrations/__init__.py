"""Adapters for other libraries' models; import a submodule (transformers, timm) explicitly, never from here."""
