"""Tiny digits recipes for end-to-end tests (seconds, not minutes)."""

TINY = {
    "name": "tiny",
    "task": {"name": "digits", "batch_size": 64},
    "model": {"name": "digits_cnn", "kwargs": {"width": 0.5}},
    "dense": {"steps": 120, "lr": 0.003},
    "prune": {"sparsity": 0.9, "frequency": 5, "score_batches": 2, "finetune": {"steps": 40}},
    "quant": {"weight_bits": 4, "act_bits": 8, "calib_batches": 2, "finetune": {"steps": 15, "lr": 2e-4}},
}
