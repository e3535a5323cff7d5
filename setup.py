"""Builds the native kernel library (llmcad/kernels/qmatmul.cpp) beside the package.

It is a plain shared library loaded with ctypes (no Python or PyTorch headers, so it builds in
seconds and needs no torch at build time); every SIMD path is compiled into it with function
target attributes and picked at run time, so no -march flag ties it to the build machine. The
extension is optional: without a C++ compiler the install succeeds and the engine uses
PyTorch's own kernels (llmcad.kernels.unavailable_reason() says why).

-ffp-contract=off keeps every multiply and add rounded on its own (the same bits on every
path); -fno-trapping-math lets GCC vectorize loops that select between floats (attention's
softmax exp and the MLP's gate had stayed scalar on AVX2): the library reads no floating-point
exception flags, and no value changes (tests/test_kernels.py checks the bits).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "llmcad.kernels._qmatmul",
            sources=["llmcad/kernels/qmatmul.cpp"],
            depends=["llmcad/kernels/tiles.h", "llmcad/kernels/attention.h"],
            language="c++",
            extra_compile_args=["-O3", "-std=c++17", "-ffp-contract=off", "-fno-trapping-math", "-fvisibility=hidden", "-pthread"],
            extra_link_args=["-pthread"],
            optional=True,
        )
    ]
)
