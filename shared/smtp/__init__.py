"""SMTP without I/O: server and client state machines, replies and address syntax."""
