"""Datasets (RE10K, DL3DV, folders, synthetic) and view samplers."""
