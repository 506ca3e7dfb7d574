"""Fetch and build the Cython evaluator that torchreid and fast-reid ship, for comparison only.

Its source is not part of this repository: it is downloaded from PyPI (the
`fastreid` wheel carries torchreid's `rank_cy.pyx`), compiled into bench/out/
(git-ignored) and imported from there. Needs `pip install cython` and a C compiler.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import zipfile
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out" / "cython_ref"
WHEEL = "fastreid==1.4.0"
MEMBER = "fastreid/evaluation/rank_cylib/rank_cy.pyx"


def load_rank_cy():
    """The compiled `rank_cy` module (built on first use)."""
    OUT.mkdir(parents=True, exist_ok=True)
    if not list(OUT.glob("rank_cy*.so")):
        if not (OUT / "rank_cy.pyx").exists():
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(OUT), WHEEL],
                           check=True)
            wheel = next(OUT.glob("fastreid-*.whl"))
            with zipfile.ZipFile(wheel) as z:
                (OUT / "rank_cy.pyx").write_bytes(z.read(MEMBER))
        setup = (
            "from setuptools import setup, Extension\nimport numpy as np\nfrom Cython.Build import cythonize\n"
            "setup(ext_modules=cythonize([Extension('rank_cy', ['rank_cy.pyx'], include_dirs=[np.get_include()],"
            " extra_compile_args=['-O3'])], language_level=3), script_args=['build_ext', '--inplace'])\n"
        )
        subprocess.run([sys.executable, "-c", setup], cwd=OUT, check=True, capture_output=True)
    sys.path.insert(0, str(OUT))
    return importlib.import_module("rank_cy")
