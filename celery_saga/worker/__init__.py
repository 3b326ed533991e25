"""What runs only inside ``celery worker``.

- `celery_saga.worker.wrapper`: the step wrapper, around each step's and
  compensation's function, where the task runs (the pool child in prefork);
- `celery_saga.worker.main_process`: outcomes Celery reports only in the
  worker's main process (a lost pool child, a hard time limit, a revoke, an
  expired message);
- `celery_saga.worker.bootstep`: the bootstep every enabled worker runs: it
  checks the configuration and runs the deadline sweeper thread;
- `celery_saga.worker.apps`: which apps are enabled in this process, and
  installing the wrapper on their tasks.
"""
