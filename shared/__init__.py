"""smarthost's common engine: one SMTP server, queue and client, shared by the three tiers."""
