"""Adapters that plug the engine into other training libraries (optional dependencies)."""
