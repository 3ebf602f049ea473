"""The exception hierarchy shared by every sparsetrace package (torch-free).

Messages name the argument, the value given and what is allowed. The CLI turns these into a one-line
error and a non-zero exit; everything else is a bug and keeps its traceback.
"""

__all__ = [
    "SparsetraceError",
    "ConfigError",
    "FormatError",
    "ModelError",
    "AttributionError",
    "GraphError",
    "RenderError",
]


class SparsetraceError(Exception):
    """Base class of every error sparsetrace raises on purpose."""


class ConfigError(SparsetraceError, ValueError):
    """An argument or config value outside what is allowed."""


class FormatError(SparsetraceError):
    """A file that is missing, truncated, corrupt or of another format/model."""


class ModelError(SparsetraceError):
    """A model that cannot be loaded or whose architecture is not supported."""


class AttributionError(SparsetraceError):
    """Attribution cannot be run on these inputs."""


class GraphError(SparsetraceError):
    """An inconsistent graph or a node that is not in it."""


class RenderError(SparsetraceError):
    """Rendering failed, e.g. graphviz's `dot` binary is missing."""
