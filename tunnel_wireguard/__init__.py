"""WireGuard for the tunnel, one package: X25519 key files (``keys``), the pure ``wg show dump`` parser
(``dump``), one interface driven with ``ip``/``wg``/``wireguard-go`` (``interface``, the only module that
runs subprocesses), and the agent's pure choice between WireGuard and its WebSocket fallback (``plan``).
Errors share one root, ``errors.WireGuardError``.
"""
