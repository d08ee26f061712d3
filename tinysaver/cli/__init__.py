"""The ``tinysaver`` command line (``python -m tinysaver.cli`` or ``tinysaver``); see ``main``."""
from .main import build_parser, main

__all__ = ["build_parser", "main"]
