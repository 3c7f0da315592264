"""User tools built on the same layers as the scorer: produce, tail, demo."""
