"""Isolation levels of local sandboxes: probing, namespaces, cgroups, network, images, admission.

Modules the template imports (``_sys``, ``namespaces``, ``cgroups``) use the standard library only:
the template runs ``python -I -S`` with a stub ``sandpool`` package and must never import trio.
Runtime-side modules (``plan``, ``admission``, ``images``, ``network``, ``probe``) are plain sync code
too; the trio glue lives in the runtime.
"""
