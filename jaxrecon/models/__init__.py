"""Floor 2: Flax modules (feature networks now; the reconstruction model later)."""
