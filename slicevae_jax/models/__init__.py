"""Flax Linen models."""
