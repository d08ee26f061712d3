"""tinysaver: a small saver model answers the easy inputs so the large base model runs less.

Data flows one way: profiler → zoo_index → selector → cascade (and the ``esn`` package).
"""
from .cascade import Cascade, CascadeResult, build_cascade
from .data import load_dataset
from .models import ModelSpec, Preprocess, create_model
from .profiler import ProfileConfig, profile
from .selector import Selection, SelectorConfig, select, select_all
from .zoo import Zoo, list_zoos, load_zoo

__version__ = "0.1.0"
__all__ = [
    "Cascade", "CascadeResult", "build_cascade", "load_dataset", "ModelSpec", "Preprocess", "create_model",
    "ProfileConfig", "profile", "Selection", "SelectorConfig", "select", "select_all", "Zoo", "list_zoos", "load_zoo",
]
