"""Install localrefine: the engine, its command line and the Scipion plugin.

``protocols/`` and ``tests/`` live at the top level of the repository and are
mapped into the package (``localrefine_plugin.protocols``,
``localrefine_plugin.tests``) because Scipion discovers protocols and tests only
inside the plugin package.
"""

from setuptools import find_packages, setup

ENGINE_PACKAGES = find_packages(include=["localrefine_plugin", "localrefine_plugin.*"])

setup(
    name="scipion-em-localrefine",
    version="0.1.0",
    description="Local refinement of masked regions in cryo-EM maps (Scipion plugin)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=[
        *ENGINE_PACKAGES,
        "localrefine_plugin.protocols",
        "localrefine_plugin.tests",
    ],
    package_dir={
        "localrefine_plugin.protocols": "protocols",
        "localrefine_plugin.tests": "tests",
    },
    package_data={
        "localrefine_plugin": ["protocols.conf", "*.png", "templates/*.json.template"],
        "localrefine_plugin.kernels": ["*.cu", "*.h"],
    },
    install_requires=[
        "scipion-pyworkflow>=3.11",
        "scipion-em>=3.11",
        "numpy>=1.24",
        "scipy>=1.9",
        "mrcfile>=1.4",
        # gemmi turns PDB/mmCIF models into density maps for `localrefine simulate`
        "gemmi>=0.6",
        # matplotlib draws the FSC curves users look at (fsc.png)
        "matplotlib>=3.5",
    ],
    extras_require={
        "gpu": ["pycuda>=2022.1"],
        "mpi": ["mpi4py>=3.1"],
        "test": ["pytest>=7", "ruff>=0.5"],
    },
    entry_points={
        "pyworkflow.plugin": ["localrefine_plugin = localrefine_plugin"],
    },
    # bin/localrefine is the launcher; pip rewrites its shebang to this interpreter
    scripts=["bin/localrefine"],
    classifiers=["Programming Language :: Python :: 3"],
)
