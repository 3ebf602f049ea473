"""Transcoders: per-layer sparse replacements of MLPs, their files, training and metrics."""

from .io import load_transcoders as load_transcoders
from .io import save_transcoders as save_transcoders
from .model import Transcoder as Transcoder
from .model import TranscoderSet as TranscoderSet
from .model import TranscoderSetConfig as TranscoderSetConfig
from .train import TrainConfig as TrainConfig
from .data import build_corpus as build_corpus
from .data import open_corpus as open_corpus
