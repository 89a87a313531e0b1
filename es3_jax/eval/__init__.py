"""Evaluation: J&F metrics and semi-supervised VOS over a dataset."""
