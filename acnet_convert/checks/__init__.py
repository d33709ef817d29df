"""Checks: verification against a reference, the quantisation report and post-training quantisation."""
