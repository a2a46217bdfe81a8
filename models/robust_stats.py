"""Robust location and spread: the median and the MAD-based standard deviation.

Teachers, students and Defect-Gen's rejection checks standardise scores on normal fabric with these: the
median and the median absolute deviation ignore the few defect pixels a sample of "normal" may hold.
"""

from __future__ import annotations

from typing import overload

import numpy as np
import torch

#: MAD x this = the standard deviation of a Gaussian.
MAD_TO_SIGMA = 1.4826


@overload
def median_and_sigma(values: np.ndarray) -> tuple[float, float]: ...
@overload
def median_and_sigma(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


def median_and_sigma(values):
    """Median and MAD-sigma of a sample (any shape, all values pooled).

    The sigma is floored at ``1e-6 |median| + 1e-12`` so that a constant sample does not divide by zero.
    A numpy array gives floats; a tensor gives 0-d tensors on its device (torch's median of an even-sized
    sample is the lower of the two middle values, numpy's their mean).
    """
    if isinstance(values, torch.Tensor):
        median = values.median()
        sigma = MAD_TO_SIGMA * (values - median).abs().median()
        return median, sigma.clamp_min(1e-6 * median.abs().item() + 1e-12)
    median = float(np.median(values))
    sigma = MAD_TO_SIGMA * float(np.median(np.abs(values - median)))
    return median, max(sigma, 1e-6 * abs(median) + 1e-12)
