"""The parts of the training engine (train/engine.py puts them together): distributed helpers, the per-batch
step and the epoch loop, evaluation, state and resume, logs."""
