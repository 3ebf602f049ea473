"""Attribution graphs: layout, storage, influence and pruning, scores, export, rendering (torch-free)."""

from .graph import Adjacency as Adjacency
from .graph import AttributionGraph as AttributionGraph
from .graph import NodeKind as NodeKind
from .graph import NodeLayout as NodeLayout
from .prune import PruneConfig as PruneConfig
from .prune import PruneResult as PruneResult
from .prune import apply_prune as apply_prune
from .prune import node_influence as node_influence
from .prune import prune_graph as prune_graph
from .scores import GraphScores as GraphScores
from .scores import graph_scores as graph_scores
from .scores import store_scores as store_scores
from .supernodes import Supernode as Supernode
from .supernodes import auto_supernodes as auto_supernodes
from .supernodes import group_nodes as group_nodes
from .export import from_networkx as from_networkx
from .export import to_circuit_tracer_json as to_circuit_tracer_json
from .export import to_networkx as to_networkx
from .html import write_html as write_html
from .card import build_card as build_card
