"""prunq: joint pruning and quantization to extreme sparsity and low bit-width."""

__version__ = "0.1.0"
