"""Adapters to other frameworks (imported on demand)."""
