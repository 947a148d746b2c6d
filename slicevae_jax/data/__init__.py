"""Data: NIfTI I/O, preprocessing, the embedded default data set, the slice cache."""
