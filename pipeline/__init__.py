"""CIFAR-10 normalization study: batch, group and layer norm in a <50k-parameter CNN, in MLflow."""

__version__ = "0.1.0"
