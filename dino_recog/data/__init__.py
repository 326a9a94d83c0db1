"""Data sets, transforms and samplers."""
