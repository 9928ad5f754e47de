"""SMTP AUTH: the SASL interface, the embedded user store, the Dovecot client."""
