"""bayeskd: knowledge distillation with teachers trained as estimators of the Bayes class probability."""

__version__ = "0.1.0"
