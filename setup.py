"""The wheel carries the bundled zoos: ``zoo_index/`` is copied into the package as
``tinysaver/zoo_index`` when it is built (an editable install reads the checkout's own folder).
Everything else is declared in pyproject.toml."""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

# written by tinysaver at run time, never shipped: export caches, writer locks
LEFT_OUT = ("exports", ".lock", "*.tmp*", "__pycache__")


class BuildWithZoos(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        dest = Path(self.build_lib) / "tinysaver" / "zoo_index"
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(Path(__file__).parent / "zoo_index", dest, ignore=shutil.ignore_patterns(*LEFT_OUT))


setup(cmdclass={"build_py": BuildWithZoos})
