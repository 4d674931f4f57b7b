"""Retries: a flaky function retried on its own exception, and a sandbox death retried elsewhere.

``retries=Retries(n, on=(SomeError,))`` re-runs a call that raised one of those exceptions (with
exponential backoff); a sandbox or worker process dying under a call is retried on a fresh one
without being named. Other exceptions come back at once, as themselves, with the remote traceback.
"""

import os

from sandpool import Retries, SandboxDefaults, Session

with Session(defaults=SandboxDefaults(tags=("examples", "retries"))) as session:
    attempts = {"flaky": 0}  # a global of the function: one copy per worker, kept between calls

    @session.function(max_concurrency=1, retries=Retries(3, on=(ConnectionError,), initial_delay=0.05))
    def flaky():
        attempts["flaky"] += 1
        if attempts["flaky"] < 3:
            raise ConnectionError(f"attempt {attempts['flaky']}: the service is not ready")
        return f"ok after {attempts['flaky']} attempts"

    @session.function(max_concurrency=1, retries=1)
    def crashy():
        if not os.path.exists("/tmp/crashed-once"):  # the sandbox's own /tmp outlives its worker
            open("/tmp/crashed-once", "w").close()
            os._exit(9)  # the worker process dies: an infrastructure failure, retried
        return "survived a dead worker"

    @session.function
    def picky(key):
        return {"a": 1}[key]

    print("flaky() ->", flaky.remote().result())
    print("crashy() ->", crashy.remote().result())
    try:
        picky.remote("b").result()
    except KeyError as error:
        print(f"picky('b') raised KeyError {error}; remote traceback in sandbox {error.__cause__.sandbox_id}")
    print(f"calls retried: {session.statistics().calls_retried}")
