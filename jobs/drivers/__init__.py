"""The drivers that job entry points and sweeps share: each reads placement plan → role groups → loop.

``jobs/<name>.py`` is the command line of one job (``python -m jobs.<name>``); the run
it starts lives here, so the pipeline, a Tune trial or an offline refinement can run
the same thing without any job importing another job.
"""
