"""Arrow schemas of every table, one module per table.

Writers, the training loader, inference and the SQL views all import these,
so a table's layout is defined in exactly one place::

    from schemas import features
    schema = features.schema(ip_tokens=16, ip_dim=2048, text_guidance=True)
"""
