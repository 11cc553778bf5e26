"""Builders of tiny reference models for tests."""
