"""The public in-memory runtime (``sandpool.testing.FakeRuntime``) and its scripted agent."""
