"""The lake: Lance tables (``tables``), read-only SQL over them (``sql``), the writer lock.

    from img.lake.tables import open_table
    from img.lake.sql import run_query
"""
