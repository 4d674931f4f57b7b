"""Overriding the session defaults per sandbox: tags, environment, resources, command.

Merge rules (cwsandbox's): tags are the defaults' followed by the sandbox's, duplicates kept;
environment variables are dict-merged with the sandbox's value winning; everything else
(resources, command, ...) is replaced whole. One deliberate difference: a ``command`` given
without ``args`` runs with no args (cwsandbox would reuse the default args).
"""

from sandpool import ResourceOptions, SandboxDefaults, Session

defaults = SandboxDefaults(
    tags=("examples", "project-alpha"),
    environment_variables={"STAGE": "dev", "REGION": "local"},
    resources={"cpu": "1", "memory": "1Gi"},  # the flat form: requests = limits
)

with Session(defaults=defaults) as session:
    plain = session.sandbox()
    tuned = session.sandbox(
        tags=["worker", "examples"],  # appended; the duplicate "examples" is kept
        environment_variables={"STAGE": "test"},  # wins over the default; REGION is kept
        resources=ResourceOptions(limits={"memory": "512Mi", "pids": 64}),  # replaces the default
        command="sleep",
        args=["infinity"],
        isolation="process",  # for the rlimit shown below (the namespaces level uses a memory cgroup)
    )

    for name, sandbox in (("default", plain), ("override", tuned)):
        spec = sandbox.spec
        print(f"{name}: tags={sandbox.tags}")
        print(f"{name}: env={dict(spec.environment_variables)}")
        print(f"{name}: memory limit={spec.resources.memory_limit} bytes, command={spec.argv()}")

    # At the process isolation level the memory limit becomes RLIMIT_DATA (`ulimit -d`, in KiB).
    result = tuned.exec(["sh", "-c", 'echo "STAGE=$STAGE REGION=$REGION data limit $(ulimit -d) KiB"']).result()
    print(f"inside the override sandbox: {result.stdout.strip()}")
