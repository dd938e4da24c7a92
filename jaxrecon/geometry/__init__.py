"""Floor 1: mesh topology and cameras as plain functions over arrays (no Flax, no I/O)."""
