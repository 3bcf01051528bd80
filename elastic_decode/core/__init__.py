"""Host bookkeeping, no tensors of the model: sequences and their budget state, KV blocks, the scheduler, and
the plain data it exchanges with the worker (step.py). Only the scheduler changes a Sequence."""
