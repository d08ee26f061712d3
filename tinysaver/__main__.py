"""``python -m tinysaver`` is the ``tinysaver`` command."""
import sys

from .cli import main

sys.exit(main())
