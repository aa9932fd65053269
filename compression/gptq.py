"""Calibrated rounding: what a compressor may do once it knows the layer's inputs.

A layer computes y = W x, so what matters is not ||W - W_c|| but the output error
E ||(W - W_c) x||^2 = sum_i (W_i - W_c,i) H (W_i - W_c,i)^T with H = E[x x^T] = X^T X / N, the
inputs' second moment (``second_moment``; a calibration pass accumulates it, see
``lora.calibration``). Two compressors use it:

- ``gptq``: error feedback (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for
  Generative Pre-trained Transformers", arXiv:2210.17323). Columns are rounded in order; the
  error each one leaves is spread over the columns not yet rounded, through the Cholesky factor
  of H^-1, so that the later columns compensate for it (Optimal Brain Surgeon's update, applied
  one column at a time and in blocks for speed). The grid (codes and scales) is fixed before,
  so the stored parts and the bit count are those of round-to-nearest. With H = I the
  feedback vanishes and GPTQ is round-to-nearest.
- ``weighted_row_errors``: the per-row output error above, which ``--int-scale mse`` minimises
  instead of the weight error when the inputs are known.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

DAMPING = 0.01  # GPTQ's default: 1% of the mean diagonal of H, so that H is invertible
BLOCK = 128  # columns whose updates are applied to the rest of the matrix in one product


def second_moment(features: torch.Tensor) -> torch.Tensor:
    """X^T X / N (in x in, float64) of N rows of inputs."""
    x = features.double()
    return x.T @ x / x.shape[0]


def weighted_row_errors(delta: torch.Tensor, moment: torch.Tensor) -> torch.Tensor:
    """sum_j,k delta_ij H_jk delta_ik per row i: the row's mean squared output error. A moment
    of groups x c x c (a grouped conv's, ``lora.calibration``) gives each consecutive
    rows/groups rows their group's H."""
    delta = delta.double()
    if moment.ndim == 3:
        grouped = delta.reshape(moment.shape[0], -1, delta.shape[1])
        return ((grouped @ moment.double()) * grouped).sum(dim=2).flatten()
    return ((delta @ moment.double()) * delta).sum(dim=1)


def _inverse_factor(moment: torch.Tensor, damping: float) -> torch.Tensor:
    """The upper Cholesky factor of (H + damping * mean(diag H) * I)^-1 (of each H of a
    groups x c x c moment)."""
    hessian = moment.double().clone()
    diagonal = hessian.diagonal(dim1=-2, dim2=-1)
    # an input that is always zero: its column cannot matter; a unit diagonal keeps H definite
    diagonal[diagonal <= 0] = 1.0
    diagonal.add_(damping * diagonal.mean(dim=-1, keepdim=True))
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(hessian))
    return torch.linalg.cholesky(inverse, upper=True)


def gptq(
    weight: torch.Tensor,
    moment: torch.Tensor,
    round_column: Callable[[torch.Tensor, int], torch.Tensor],
    damping: float = DAMPING,
    block: int = BLOCK,
) -> torch.Tensor:
    """W_c (rows x cols, float64) by GPTQ: ``round_column(w, j)`` rounds column j (rows,
    float64) onto the compressor's fixed grid; ``moment``: the inputs' H (cols x cols), or one
    per group of consecutive rows (groups x cols x cols, a grouped conv's): every row then
    feeds its error back through its own group's factor, all groups at once."""
    rows, cols = weight.shape
    grouped = moment.ndim == 3 and rows % moment.shape[0] == 0
    if moment.shape[-2:] != (cols, cols) or not (grouped or moment.ndim == 2):
        raise ValueError(
            f"the input moment is {tuple(moment.shape)}; a {rows} x {cols} weight needs "
            f"{cols} x {cols}, or groups x {cols} x {cols} with groups dividing {rows}"
        )
    factor = _inverse_factor(moment, damping)
    groups = moment.shape[0] if grouped else 1
    group_of_row = torch.arange(rows, device=weight.device) // (rows // groups)

    def own(values: torch.Tensor) -> torch.Tensor:
        """A per-row value of the factor: each row's own group's (a grouped moment), else the
        one factor's, broadcast over the rows."""
        return values[group_of_row] if grouped else values

    work = weight.double().clone()
    rounded = torch.empty_like(work)
    for start in range(0, cols, block):
        end = min(start + block, cols)
        part = work[:, start:end].clone()
        errors = torch.empty_like(part)
        local = factor[..., start:end, start:end]
        for k in range(end - start):
            column = part[:, k]
            done = round_column(column, start + k)
            rounded[:, start + k] = done
            error = (column - done) / own(local[..., k, k])
            # the columns of this block not yet rounded absorb the error at once; the later
            # blocks absorb the whole block's errors in one product below
            part[:, k + 1 :] -= error.unsqueeze(1) * own(local[..., k, k + 1 :])
            errors[:, k] = error
        if grouped:  # each group's rows through its own factor, one batched product
            trailing = errors.view(groups, -1, end - start) @ factor[:, start:end, end:]
            work[:, end:] -= trailing.reshape(rows, -1)
        else:
            work[:, end:] -= errors @ factor[start:end, end:]
    return rounded
