"""The dev kit: what the tests, the demo and the benchmark use to run the product as processes.

Development only: the production wheel does not ship it (pyproject.toml), and it never imports ``tests``.
Run it from the checkout (the repository root on ``sys.path``, as ``python -m`` and pytest's conftest do).

Modules, one concern each:
- ``procs``     child processes with a log file, ended by their own PID (SIGTERM, grace, SIGKILL), newest
                first, by one ``ProcessTracker``; short commands run to completion with a timeout.
- ``waits``     ``wait_until`` / ``wait_for_port`` / ``port_accepts``: polling with a deadline, never a sleep.
- ``ports``     free TCP ports on 127.0.0.1.
- ``programs``  where programs are: the product's console scripts, native binaries outside the venv.
- ``netns``     a network-namespace lab: namespaces, veth pairs, processes inside them, all undone.
- ``firewall``  the hospital's nftables table in a lab namespace, with counters.
- ``stack``     a real relay and real agents as processes: configs, certificates, start, wait.
- ``fixtures``  the pytest side: ``procs`` / ``module_procs`` fixtures, ``open_lab``, prerequisite policy.
- ``errors``    the one exception root, ``DevkitError``.
"""
