"""Exit codes of jobq's commands and processes (documented in the README)."""

#: Success.
OK = 0
#: A command's work failed (a job waited on with --wait failed, a worker crashed, a master
#: did not apply `jobq workers`).
FAILURE = 1
#: Bad usage or configuration: unknown option, bad JSON, a config key with a bad value, a
#: deletion with neither a terminal to confirm on nor --yes.
USAGE = 2
#: The Redis/Valkey server cannot be reached, or refused our credentials.
CONNECT = 3
#: A task module (-I/--import, imports = [...]) failed to import.
IMPORT = 4
#: The job, queue, schedule, master or task named does not exist (a task: no running worker
#: announced it).
NOT_FOUND = 5
#: The pidfile names a running master.
PIDFILE = 6
#: Workers keep dying right after they start (the master's crash-rate breaker tripped).
WORKER_BOOT = 7
#: The embedded server could not be started.
SERVER = 8
