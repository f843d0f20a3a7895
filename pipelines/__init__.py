"""Ray Data pipelines: pure functions from a source and a config to lake tables.

    from pipelines.embed import run_embed

``IMPORT_STARTED_AT``: when this process began importing the package. In a Ray actor that is when Ray
handed it the stage to build, so the start-up split can tell Ray's scheduling from the stage's own imports.
"""
import time

IMPORT_STARTED_AT = time.time()
