"""The ``ironwal-mp`` command line (also ``python -m ironwal_mp``).

``main`` parses arguments and dispatches to one module per job: ``ingest`` (the main job),
``serve``, ``checkpoints``, ``replay``, ``audit`` (inspect, verify, repair) and ``stats``.
Exit codes: 0 success, 1 a finding (corruption, a failed check), 2 a usage error.
"""
