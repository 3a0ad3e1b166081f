"""Evaluation: the embedded task suite (``tasks``), the text corpus (``corpus``) and evaluators."""
