"""Sans-io protocol code: bytes in, events and commands out. Nothing here imports mitmproxy or does I/O."""
