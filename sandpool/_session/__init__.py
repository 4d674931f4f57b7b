"""Sessions and sandboxes: the Session (a nursery), the Sandbox handle, processes, files, logs,
terminals, blocks and shared-runtime handles."""
