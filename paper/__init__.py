"""Regenerates the paper's figures, tables and document from the benchmarks' JSON (``make_paper``)."""
