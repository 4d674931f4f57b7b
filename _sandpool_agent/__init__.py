"""The sandbox side: everything that runs in a sandbox's template, supervisor, agent and call
worker. Standard library and msgpack only: it never imports sandpool, trio or grpc (a cold
interpreter test proves it), so a sandbox starts in milliseconds."""
