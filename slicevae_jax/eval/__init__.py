"""Evaluation, the last stage: RAS segmenter, scoring of generated volumes, the report."""
