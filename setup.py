"""Build the compiled hot paths: every ext/NAME.pyx becomes the module engine._NAME."""

from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension(f"engine._{source.stem}", [str(source)], extra_compile_args=["-O3"])
    for source in sorted(Path("ext").glob("*.pyx"))
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
    ),
)
