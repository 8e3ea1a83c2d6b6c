"""featstack: frozen ImageNet backbones -> cached features -> stacked models -> Kaggle submissions."""
import os

# TensorFlow prints pages of start-up noise; users asked for a progress bar, not that.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
