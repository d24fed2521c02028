"""Revisions of the reporting service, applied in order at start-up."""
