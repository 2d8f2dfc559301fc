"""What both programs need to run as services, apart from the byte path: the settings base (``settings``:
TOML plus environment, one error naming every wrong key), logging and the service loop (``service``),
Prometheus helpers (``metrics``) and the process's own numbers (``procstats``)."""
