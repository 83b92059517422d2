"""Datasets: facts (classes, palettes), split lists, readers, transforms and prepare-data converters."""
