"""Data quality: duplicates, leakage between the splits, labels and personal data, found by the validation pass."""
