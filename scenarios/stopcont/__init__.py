"""Conformance scenarios (collected by pytest; shipped with the package as qtest_virtio_scenarios)."""
