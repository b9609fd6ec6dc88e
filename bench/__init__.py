"""Benchmarks of nashalign (not tests: nothing here asserts on time). Entry point: `python -m bench.run`."""
