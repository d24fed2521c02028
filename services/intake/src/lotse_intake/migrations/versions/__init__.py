"""Revisions of the intake service, applied in order at start-up."""
