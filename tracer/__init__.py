"""Tracing: load a model, attribute a prompt into a graph, intervene, inspect features."""

from .models import load_model as load_model
from .attribution import AttributionConfig as AttributionConfig
from .attribution import attribute as attribute
from .interventions import intervene as intervene
from .features import inspect_feature as inspect_feature
from .training import train_transcoders as train_transcoders
from .evaluate import evaluate_transcoders as evaluate_transcoders
