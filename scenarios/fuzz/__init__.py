"""Hostile-driver fuzzing scenarios (qtest_virtio.fuzz) with a tiny default budget."""
