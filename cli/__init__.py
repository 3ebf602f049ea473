"""The ``sparsetrace`` command line (thin click commands over the library)."""

from ._main import main as main
