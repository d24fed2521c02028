"""The runtime's revisions (branch ``runtime``): the outbox and inbox of every service."""
