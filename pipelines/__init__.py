"""Ray Data pipelines: pure functions from a source and a config to lake tables.

    from pipelines.embed import run_embed
"""
