"""Helpers of the front doors and the trainer: answers and voting, JSONL input, output paths."""
