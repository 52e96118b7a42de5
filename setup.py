"""The one compiled part: kvstore._byteplanes (kvstore/byteplanes.py says why). Optional: without
a C compiler the install still succeeds and the codec runs its numpy loops instead."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("kvstore._byteplanes", ["kvstore/_byteplanes.c"],
                             extra_compile_args=["-O3"], optional=True)])
