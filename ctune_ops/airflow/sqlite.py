"""Connection arguments for an Airflow metadata DB on SQLite (the embedded demo), imported by Airflow itself.

Why: the api-server, scheduler, dag-processor and CLI commands (``airflow backfill create``) are separate
processes writing one SQLite file; Python's sqlite3 gives up on a lock after 5 s and the command fails with
"database is locked" (seen on a loaded 2-core machine while the scheduler was busy). Airflow reads
``[database] sql_alchemy_connect_args`` as an import path to a dict; this module holds that dict and imports
nothing, since Airflow imports it while it configures itself.
"""

BUSY_TIMEOUT_S = 60  # how long a process waits for another's write lock before failing
CONNECT_ARGS = {"timeout": BUSY_TIMEOUT_S}
