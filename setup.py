"""The proxy's one C module, proxy._h2session (HTTP/2 over libnghttp2; see proxy/_h2session.c).
Everything else about the package is in pyproject.toml.

The module declares the part of libnghttp2's interface it uses itself and links the system's
libnghttp2.so.14 (the library curl uses; Debian and Ubuntu package it as libnghttp2-14), so a
build needs a C compiler and the Python headers, not a -dev package.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "proxy._h2session",
    sources=["proxy/_h2session.c", "proxy/_h2session_callbacks.c"],
    depends=["proxy/_h2session.h", "proxy/_nghttp2_abi.h"],
    extra_compile_args=["-O2", "-fvisibility=hidden", "-Wall", "-Wextra", "-Wno-unused-parameter",
                        "-Wno-missing-field-initializers"],
    extra_link_args=["-l:libnghttp2.so.14"],
)])
