"""Training on Ray Train: the TorchTrainer (trainer.py), the per-worker loop (worker.py)."""
