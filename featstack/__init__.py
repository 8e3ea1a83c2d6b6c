"""featstack: frozen ImageNet backbones -> cached features -> stacked models -> Kaggle submissions."""

__version__ = "0.1.0"
