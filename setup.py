"""Build the compiled hot paths: every ext/NAME.pyx becomes the module engine._NAME."""

from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup

# Modules that link a system library; each has a pure twin, so where the library's headers are missing
# (liblmdb-dev) the build goes on without it and the engine uses the twin.
LIBRARIES = {"spooldb": ["lmdb"]}

extensions = [
    Extension(
        f"engine._{source.stem}",
        [str(source)],
        libraries=LIBRARIES.get(source.stem, []),
        extra_compile_args=["-O3"],
    )
    for source in sorted(Path("ext").glob("*.pyx"))
]

modules = cythonize(
    extensions,
    language_level=3,
    compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
)
for module in modules:  # cythonize does not carry `optional` over
    module.optional = module.name.removeprefix("engine._") in LIBRARIES

setup(ext_modules=modules)
