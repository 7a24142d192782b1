"""Names Ray's documentation imports from ``ray.serve._private`` (see ``common``)."""
