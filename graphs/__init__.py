"""Attribution graphs: layout, storage, influence and pruning, scores, export, rendering (torch-free)."""

from .graph import Adjacency as Adjacency
from .graph import AttributionGraph as AttributionGraph
from .graph import NodeKind as NodeKind
from .graph import NodeLayout as NodeLayout
