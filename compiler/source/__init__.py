"""Source models: load a local diffusers folder, or write one with deterministic random weights."""

from compiler.source.init import ARCHS, init_model
from compiler.source.load import SourceModel, load_source

__all__ = ["ARCHS", "SourceModel", "init_model", "load_source"]
