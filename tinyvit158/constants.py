"""The constants that fix the bits of the float numerics: every implementation (the Numba
kernels, their NumPy references, the PyTorch twin) imports them from here.

- GELU's erf: Eigen's rational float32 approximation on [-4, 4] (``|error| <= 4.2e-7``
  against the exact erf): ``erf(z) = z P(z^2) / Q(z^2)``, Horner's rule from the first
  coefficient, each rounded to float32.
- exp for the int8 attention's float32 softmax (Cephes ``expf``): ``x = k ln2 + r``,
  ``|r| <= ln2 / 2``, ``exp(r) = 1 + r + r^2 P(r)``; ``ln 2 = EXP32_LN2_HI + EXP32_LN2_LO``
  with ``k * EXP32_LN2_HI`` exact; ``|error| <= 2`` ulps.
"""

ERF_P = (
    -2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
    -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02,
)  # fmt: skip
ERF_Q = (
    -1.45660718464996e-05,
    -2.13374055278905e-04,
    -1.68282697438203e-03,
    -7.37332916720468e-03,
    -1.42647390514189e-02,
)

EXP32_MIN = -87.0  # exp(-87) = 1.6e-38, still a normal float32
EXP32_INV_LN2 = 1.44269504088896341
EXP32_LN2_HI = 0.693359375
EXP32_LN2_LO = -2.12194440e-4
EXP32_P = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)
