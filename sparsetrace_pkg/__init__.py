"""sparsetrace: circuit tracing and attribution graphs for language models.

Subpackages: :mod:`sparsetrace.tracer`, :mod:`sparsetrace.transcoders`, :mod:`sparsetrace.graphs`,
:mod:`sparsetrace.cli`.
"""

__version__ = "0.1.0"
