"""Build the optional compiled kernels; all other metadata lives in pyproject.toml.

``optional=True``: without a C compiler the plugin still installs and runs its numpy code.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "dcpx_zstd._kernels",
            ["src/dcpx_zstd/_kernels.c"],
            optional=True,
            extra_compile_args=["-O3"],
        )
    ]
)
