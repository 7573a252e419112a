"""Distributed training with Ray Train: ``driver`` (the TorchTrainer, resume, registration) and ``worker`` (what
every training worker runs)."""
