"""Floor 2: datasets (tfds builders over array_record, TF-free) and the grain input pipeline."""
