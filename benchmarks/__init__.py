"""Benchmarks: scripts that print tables, this project against peers in the same run.

Run them as modules from the repository root, so that they import the project's
package and the models of the tests (`tests.models`) from this checkout:
``python -m benchmarks.gmm_stream``, ``python -m benchmarks.fresh_fit`` and
``python -m benchmarks.generalized_em`` (``--help``).
"""
