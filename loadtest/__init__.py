"""Load tests of the screening service (locust): scenarios, a concurrency sweep and a soak.

See ``loadtest/README.md``. Nothing here is imported by the package or the service.
"""
