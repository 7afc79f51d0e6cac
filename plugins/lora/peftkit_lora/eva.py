"""EVA, Explained Variance Adaptation (Paischer et al. 2024, arXiv:2410.07170): the math.

A LoRA layer computes ``s·B A x``. EVA starts A at the top right-singular vectors of the layer's inputs
``X`` (rows: one token's input each), centred, that is their principal directions, and B at zero, so the
adapter changes no output at first and its first gradients act along the directions the data spans most.

The inputs arrive in batches, so each layer keeps an incremental PCA (:class:`IncrementalPCA`) of the
rows seen, and stops once its directions no longer move: the cosine similarity of each direction to the
previous batch's reaches ``tau``. Each layer computes up to ``round(r · rho)`` directions; the rank budget,
the sum of the layers' ``r``, then goes to the directions whose explained-variance ratio is largest across
all layers (:func:`redistribute_ranks`), so a layer whose inputs spread over more directions gets more rank.
"""

from __future__ import annotations

import torch


class IncrementalPCA:
    """The top ``k`` principal directions of a stream of row batches, updated one batch at a time.

    After ``n`` rows with mean μ, components ``V`` (k, d) and singular values ``S``, a batch ``X_b`` of
    ``b`` rows with mean μ_b updates them to the SVD of the stacked rows (Ross et al. 2008)::

        [ diag(S) V ;  X_b − μ_b ;  √(n·b / (n+b)) · (μ_b − μ) ]

    keeping its top ``k``; μ becomes the mean of all ``n + b`` rows. Exact while the rows seen span at most
    ``k`` directions (or the same batch comes again); otherwise what lies beyond the top ``k`` is dropped at
    each step, as EVA's PCA does. Signs are fixed so that each direction's largest entry is positive, which
    makes directions comparable from batch to batch. ``total_ss`` is Σ‖x − μ‖² over all rows seen, so a
    direction's explained-variance ratio is ``S_i² / total_ss``.
    """

    def __init__(self, k: int) -> None:
        self.k = k
        self.n = 0
        self.mean: torch.Tensor | None = None
        self.components: torch.Tensor | None = None  # (k, d), orthonormal rows
        self.singular_values: torch.Tensor | None = None  # (k,)
        self.total_ss = 0.0
        # per direction: its cosine similarity to the previous batch's reached tau (False before two batches)
        self.converged = torch.zeros(k, dtype=torch.bool)

    def update(self, rows: torch.Tensor, tau: float) -> None:
        rows = rows.detach().to(torch.float32)
        b = rows.shape[0]
        batch_mean = rows.mean(0)
        centred = rows - batch_mean
        batch_ss = float(centred.square().sum())
        if self.n == 0:
            stacked, mean, total_ss = centred, batch_mean, batch_ss
        else:
            shift = batch_mean - self.mean
            weight = (self.n * b / (self.n + b)) ** 0.5
            stacked = torch.cat(
                [self.singular_values[:, None] * self.components, centred, weight * shift[None, :]]
            )
            mean = self.mean + shift * (b / (self.n + b))
            total_ss = self.total_ss + batch_ss + weight**2 * float(shift.square().sum())
        _, s, vh = torch.linalg.svd(stacked, full_matrices=False)
        s, vh = s[: self.k], vh[: self.k]
        vh = vh * _sign_of_largest_entry(vh)[:, None]
        if self.components is not None:
            similarity = torch.nn.functional.cosine_similarity(vh, self.components, dim=1)
            self.converged = (similarity >= tau).cpu()
        self.n, self.mean, self.total_ss = self.n + b, mean, total_ss
        self.components, self.singular_values = vh, s

    @property
    def explained_variance_ratio(self) -> torch.Tensor:
        return self.singular_values.square() / self.total_ss

    def converged_up_to(self, rank: int) -> bool:
        """Whether the first ``rank`` directions have all converged."""
        return bool(self.converged[:rank].all())


def _sign_of_largest_entry(rows: torch.Tensor) -> torch.Tensor:
    largest = rows.abs().argmax(dim=1)
    sign = torch.sign(rows[torch.arange(rows.shape[0]), largest])
    return torch.where(sign == 0, torch.ones_like(sign), sign)


def redistribute_ranks(ratios: dict[str, torch.Tensor], budget: int) -> dict[str, int]:
    """The rank of each layer: how many of the ``budget`` largest explained-variance ratios, over all
    layers' directions (each layer's cut to its ``round(r · rho)``), are its own. Ties go to the layer
    named first, so the result does not depend on the sort."""
    names = list(ratios)
    owners = torch.cat([torch.full((len(ratios[name]),), i) for i, name in enumerate(names)])
    values = torch.cat([ratios[name].float().cpu() for name in names])
    order = torch.sort(values, descending=True, stable=True).indices[:budget]
    counts = torch.bincount(owners[order], minlength=len(names))
    return {name: int(count) for name, count in zip(names, counts)}


def eva_rows(pca: IncrementalPCA, rank: int, whiten: bool) -> torch.Tensor:
    """A's rows for a layer of rank ``rank``: its top directions, each divided by √S_i when whitened."""
    rows = pca.components[:rank].clone()
    if whiten:
        rows /= pca.singular_values[:rank].sqrt()[:, None]
    return rows
