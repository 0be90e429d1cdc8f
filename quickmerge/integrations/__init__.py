"""Integrations with model libraries; each module imports its library lazily."""
