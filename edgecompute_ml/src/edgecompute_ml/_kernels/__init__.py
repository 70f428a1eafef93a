"""Kernels of this package's own, compiled at first use with the system C++ compiler
(:mod:`.build`): ``q4.cpp``, the 4-bit weight-only matmul of ``_formats/quant.py``, and
``linear.cpp``, the float32 linear of the encoders (``_architectures/dense.py``)."""
