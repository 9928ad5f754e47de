"""The durable queue: spool files and states (store), the scheduler (manager),
RFC 3464 bounces (bounce) and the admin operations (admin)."""
from shared.queue.bounce import make_bounce
from shared.queue.manager import QueueManager, QueueSettings
from shared.queue.store import (
    STATES, CorruptFile, IncomingMessage, QueuedMessage, RecoveryReport, Spool, SpoolFiles,
    SpoolLocked,
)

__all__ = [
    "STATES", "CorruptFile", "IncomingMessage", "QueueManager", "QueueSettings", "QueuedMessage",
    "RecoveryReport", "Spool", "SpoolFiles", "SpoolLocked", "make_bounce",
]
