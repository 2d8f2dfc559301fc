"""The ``tunnel-agent`` program: the outbound-only hospital agent."""
