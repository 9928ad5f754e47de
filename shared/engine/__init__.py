"""The engine every tier runs: a session handler that runs checks at each SMTP
phase and hands accepted mail to the tier's sink (proxy, queue or mailbox)."""
