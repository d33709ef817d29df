"""Integrations with training frameworks; each submodule imports its framework, this package imports none."""
