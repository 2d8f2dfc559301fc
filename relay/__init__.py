"""The ``tunnel-relay`` program: cloud relay, tunnel endpoint, DICOM ingress and its own CA."""
