"""Evaluation: generation metrics (ADM suite), reconstruction metrics, probes, reports."""
