"""imguard: an instant-messaging security gateway."""

__version__ = "0.1.0"
