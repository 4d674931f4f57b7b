"""Confinement, applied by the template and supervisor as a sandbox starts: namespaces, cgroups,
the syscall filter, user namespaces, storage and the OCI bundle."""
