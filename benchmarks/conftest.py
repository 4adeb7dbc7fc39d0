"""pytest-benchmark runs (make bench-pytest): the same cases as table.py."""
