"""Revisions of the visits service, applied in order at start-up."""
