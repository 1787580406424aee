"""Training of dual-head networks: joint classification + segmentation loss, grouped validation.

Import ``tumorlens.training.train.train``; nothing heavy is imported here so the CLI starts fast.
"""
