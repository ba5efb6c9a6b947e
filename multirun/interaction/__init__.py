"""Interaction tests: arms trained from one checkpoint, and the matrix of their effects."""
