"""The qtest-virtio pytest plugin (entry point ``pytest11``: ``pytest_qtest_virtio.plugin``)."""
