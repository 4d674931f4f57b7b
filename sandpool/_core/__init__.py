"""The trio primitives every layer above uses: operation refs and hosts (trio, asyncio, threads),
the portal, lifecycle transitions, frame channels, output buffers and request routing."""
