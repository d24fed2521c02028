"""Revisions of the delivery service, applied in order at start-up."""
