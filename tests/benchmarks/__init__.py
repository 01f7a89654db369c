"""Issue #7's benchmark (not part of the test run: no ``test_*`` files here).

Run it from the repository root with ``python -m tests.benchmarks`` (``--help``); see
docs/performance.md for what each figure means and the last measured table.
"""
