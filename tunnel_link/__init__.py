"""Shared asyncio adapters: mux session over WebSocket, TCP splice, TLS contexts, sockets, config."""
