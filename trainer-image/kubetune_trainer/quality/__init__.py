"""Data quality, checked in the validation's pass over the records (docs/data-quality.md): duplicates inside a
split, evaluation records the train split also holds (leakage), personal data and secrets in the training text,
and for classification conflicting, suspect and rare labels. What each finding does is `dataset.quality`."""
