"""Training: long-tailed data, multi-expert networks, methods, and the checkpoint export reads."""
