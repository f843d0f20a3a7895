"""The application layer on top of the library: profile checks, benchmarks, the web demo.

Nothing in the library imports from here; ``img/cli.py`` wires these to commands.
"""
