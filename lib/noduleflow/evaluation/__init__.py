"""Evaluation: segmentation of patches, and (later) forecasts against the real follow-up and baselines."""
