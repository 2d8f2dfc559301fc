"""The pure protocol core shared by the relay and the agent.

Nothing in this package does I/O, reads a clock, logs or starts tasks: it takes bytes and returns
events and bytes (sans-IO, in the manner of h11 and h2). The asyncio adapters live in ``tunnel_link``.

Modules:
- ``frames``  — the mux wire format: frame codec and incremental parser.
- ``mux``     — one tunnel connection: stream state machine, per-stream and per-connection flow control.
- ``dicom``   — A-ASSOCIATE-RQ sniffer, A-ASSOCIATE-RJ / A-ABORT builders.
- ``routing`` — pure routing decisions (called AE → site/route, route → destination).
- ``heartbeat`` — keepalive deadlines and dead-peer detection (silent, or not reading), time passed in.
- ``backoff`` — full-jitter exponential backoff, randomness passed in.
- ``refusal`` — why the relay refused or ended a tunnel (``Tunnel-Refused``, GOAWAY ``REVOKED``), as the
  agent reports it and how long it waits.
- ``admission`` — caps on connections that have not authenticated, per source and in total.
- ``ratelimit`` — per-source token buckets with a shared total (enrollment, admin logins), time passed in.
- ``health`` — the agent's REPORT and the site condition decided from it.
- ``token`` — the one-line enrollment token.
"""
