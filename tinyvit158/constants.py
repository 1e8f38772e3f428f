"""The constants that fix the bits of both numerics: every implementation (the Numba
kernels, their NumPy references, the PyTorch twin) imports them from here.

- GELU's erf: Eigen's rational float32 approximation on [-4, 4] (``|error| <= 4.2e-7``
  against the exact erf): ``erf(z) = z P(z^2) / Q(z^2)``, Horner's rule from the first
  coefficient, each rounded to float32.
- exp for the int8 attention's float32 softmax (Cephes ``expf``): ``x = k ln2 + r``,
  ``|r| <= ln2 / 2``, ``exp(r) = 1 + r + r^2 P(r)``; ``ln 2 = EXP32_LN2_HI + EXP32_LN2_LO``
  with ``k * EXP32_LN2_HI`` exact; ``|error| <= 2`` ulps.
- exp for the float attention's float64 softmax: the same reduction, Taylor to degree 13.
- integer numerics (``docs/FORMAT.md`` 7.5): Q16 and its saturation; I-BERT's i-GELU and
  i-exp coefficients in Q16.
"""

import math

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

# exp for the float attention's float64 softmax: x = k ln2 + r, Taylor to degree 13 (fdlibm's ln 2 split)
EXP64_INV_LN2 = 1.4426950408889634
EXP64_LN2_HI = 6.93147180369123816490e-01  # ln 2 split so that n * EXP64_LN2_HI is exact (fdlibm)
EXP64_LN2_LO = 1.90821492927058770002e-10
EXP64_INV_FACT = tuple(1.0 / math.factorial(k) for k in range(13, -1, -1))  # 1/13!, ..., 1/1!, 1/0!

# integer numerics (``integer.py``, ``kernels/intops.py``): Q16 values, I-BERT's polynomials
FRAC = 16  # Q16: an activation v stands for v / 2**16
INT_ONE = 1 << FRAC
INT_SAT = (1 << 24) - 1  # the residual stream's saturation: |v| <= 2**24 - 1 (a real 256)
GELU_A = round(-0.2888 * INT_ONE)  # i-GELU: erf(u) ~ sign(u) * (A (min(|u|, -B) + B)**2 + 1)
GELU_B = round(-1.769 * INT_ONE)
INV_SQRT2 = round(INT_ONE / math.sqrt(2.0))
EXP_A = round(0.3585 * INT_ONE)  # i-exp: exp(p) ~ A (p + B)**2 + C on (-ln 2, 0]
EXP_B = round(1.353 * INT_ONE)
EXP_C = round(0.344 * INT_ONE)
INT_LN2 = round(math.log(2.0) * INT_ONE)
