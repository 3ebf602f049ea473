"""Tracing: load a model, attribute a prompt into a graph, intervene, inspect features."""

from .models import load_model as load_model
from .attribution import AttributionConfig as AttributionConfig
from .attribution import attribute as attribute
from .interventions import intervene as intervene
from .features import inspect_feature as inspect_feature
