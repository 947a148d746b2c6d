"""Data, the head of the data flow: NIfTI files or the embedded template -> cache -> batches."""
