"""Revisions of the referrals service, applied in order at start-up."""
