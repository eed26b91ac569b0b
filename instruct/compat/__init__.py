"""Adapters around the private APIs of our dependencies, one module per library."""
