"""The sandbox side: the template that forks agents, and the agent inside each sandbox.

Nothing here imports trio or grpc, so an agent starts in milliseconds in any image with Python.
"""
