"""Where sandboxes come from: the runtime contract and its implementations."""
