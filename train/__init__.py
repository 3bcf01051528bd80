"""Compact GRPO trainer with budget-constrained rollouts (installed as elastic_decode.train).

Only the public engine API is used from here. The trainer itself lands with its own issue."""
