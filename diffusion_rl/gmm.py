"""Gaussian mixtures with a known denoiser: the ground truth of the benchmark in docs/groundtruth.md.

A `GaussianMixture` keeps each covariance in eigen form, Sigma_k = U_k diag(lam_k) U_k^T + res_k (I - U_k U_k^T),
so Sigma_k + sigma^2 I has the same eigenvectors at every sigma: its log-density, its exact posterior mean
E[x0 | x0 + sigma eps = x] and the probability-flow ODE need no matrix inversion per call (groundtruth.md §1-§3).
"full" is r = D (no residual), "lowrank" a rank r plus an isotropic residual (a mixture of probabilistic PCA).
Tensors are float64 inside; points are flat [B, D] (`sample_shape` tells the image shape).
"""
from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from .errors import ConfigError, check_choice, check_positive

__all__ = ["COVARIANCES", "SOURCES", "GaussianMixture", "ExactDenoiser", "fit_gmm", "fitted_mixture", "EigenForm",
           "eigen_form", "component_log_densities", "mixture_posterior_mean", "rk4_log_sigma", "parse_gmm_name"]

COVARIANCES: tuple[str, ...] = ("full", "lowrank")
SOURCES: dict[str, dict] = {  # the fit settings of each gmm:<source> data set (groundtruth.md §4)
    "digits": {"components": 10, "covariance": "full", "rank": None},
    "mnist5k": {"components": 10, "covariance": "lowrank", "rank": 48},
}
VERSION = 1  # bump when the fit changes: it invalidates the cache
ODE_STEPS = 256  # RK4 steps in log sigma over [sigma_min, sigma_max]: pixel error ~1e-5 (groundtruth.md §3)
_LOG_2PI, _LOG2_E = math.log(2 * math.pi), 1 / math.log(2)


# ---- the maths, as pure functions of the mixture's tensors (groundtruth.md §2) ------------------------------------

class EigenForm(NamedTuple):
    """The per-call constants of a mixture: means [K, D], the eigenvectors side by side [D, K r], the means'
    projections [K, r] and squared norms [K], eigenvalues [K, r], residual variances [K], the residual's rank D - r."""
    means: Tensor
    basis: Tensor
    mean_proj: Tensor
    mean_norm2: Tensor
    vals: Tensor
    res: Tensor
    rest: int


def eigen_form(means: Tensor, vecs: Tensor, vals: Tensor, res: Tensor) -> EigenForm:
    """Precompute an `EigenForm` from means [K, D], eigenvectors [K, D, r], eigenvalues [K, r], residuals [K]."""
    k, d, r = vecs.shape
    return EigenForm(means, vecs.permute(1, 0, 2).reshape(d, k * r), torch.einsum("kd,kdr->kr", means, vecs),
                     (means * means).sum(1), vals, res, d - r)


def _sigma2(sigma: Tensor | float) -> Tensor:
    """sigma^2 as [1, 1] (one level, even repeated over a batch: the samplers' case) or [B, 1]."""
    s = torch.as_tensor(sigma, dtype=torch.float64).cpu().reshape(-1, 1)
    return s[:1] ** 2 if bool((s == s[0]).all()) else s ** 2


# float64 exp/log/softmax go through MKL's threaded vector maths: on busy shared cores each call waits ~10 ms for a
# thread, whatever its size, and the ODE makes thousands. exp2 and log1p do not, so the hot path uses them.
def _exp(z: Tensor) -> Tensor:
    return torch.exp2(z * _LOG2_E)


def _log(p: Tensor) -> Tensor:
    return torch.log1p(p - 1)


def _logsumexp(z: Tensor) -> Tensor:
    """log sum_k exp z[:, k], [B, 1]."""
    m = z.amax(1, keepdim=True)
    return m + _log(_exp(z - m).sum(1, keepdim=True))


def _softmax(z: Tensor) -> Tensor:
    return _exp(z - _logsumexp(z))


def component_log_densities(x: Tensor, sigma: Tensor | float, f: EigenForm) -> tuple[Tensor, Tensor]:
    """(log N(x; mu_k, Sigma_k + sigma^2 I) [B, K], the projections U_k^T (x - mu_k) [B, K, r]), from the eigen
    form, without forming x - mu_k [B, K, D]."""
    k, r = f.vals.shape
    s2 = _sigma2(sigma)
    proj = (x @ f.basis).reshape(-1, k, r) - f.mean_proj
    proj2 = proj * proj
    lam = f.vals + s2[..., None]  # [1 or B, K, r]
    quad = torch.einsum("bkr,bkr->bk", proj2, (1 / lam).expand(x.shape[0], k, r))
    logdet = _log(lam).sum(-1)
    if f.rest:  # the isotropic residual outside span(U_k)
        dist2 = (x * x).sum(1, keepdim=True) - 2 * x @ f.means.T + f.mean_norm2
        perp = (dist2 - proj2.sum(-1)).clamp_min(0)
        quad, logdet = quad + perp / (f.res + s2), logdet + f.rest * _log(f.res + s2)
    return -0.5 * (quad + logdet + (f.means.shape[1]) * _LOG_2PI), proj


def mixture_posterior_mean(x: Tensor, sigma: Tensor | float, log_w: Tensor, f: EigenForm) -> tuple[Tensor, Tensor]:
    """(E[x0 | x] [B, D], responsibilities [B, K]) under noise sigma (groundtruth.md §2):
    sum_k r_k(x) [mu_k + Sigma_k (Sigma_k + sigma^2 I)^-1 (x - mu_k)], r_k under N(mu_k, Sigma_k + sigma^2 I)."""
    logp, proj = component_log_densities(x, sigma, f)
    resp = _softmax(log_w + logp)
    s2 = _sigma2(sigma)
    a = f.res / (f.res + s2) if f.rest else torch.zeros_like(s2)  # [1 or B, K]: the shrink outside span(U_k)
    c = f.vals / (f.vals + s2[..., None]) - a[..., None]  # [1 or B, K, r]: the extra shrink inside span(U_k)
    inside = (resp[..., None] * c * proj).reshape(x.shape[0], -1) @ f.basis.T
    return (resp * a).sum(1, keepdim=True) * x + (resp * (1 - a)) @ f.means + inside, resp


def rk4_log_sigma(velocity, x: Tensor, sigmas: Sequence[float], steps: int) -> Tensor:
    """States [M, B, D] at the decreasing `sigmas` (M >= 1) of dx/dt = velocity(x, sigma), t = log sigma, by RK4;
    `steps` steps over the whole span, shared out by each segment's length in t (groundtruth.md §3)."""
    ts = [math.log(s) for s in sigmas]
    span = max(abs(ts[0] - ts[-1]), 1e-12)
    out = [x]
    for t0, t1 in zip(ts[:-1], ts[1:]):
        n = max(1, math.ceil(steps * abs(t1 - t0) / span))
        h = (t1 - t0) / n
        for j in range(n):
            t = t0 + j * h
            k1 = velocity(x, math.exp(t))
            k2 = velocity(x + h / 2 * k1, math.exp(t + h / 2))
            k3 = velocity(x + h / 2 * k2, math.exp(t + h / 2))
            k4 = velocity(x + h * k3, math.exp(t + h))
            x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        out.append(x)
    return torch.stack(out)


def _one_blas_thread():
    """A context for NumPy's LAPACK on these small matrices: threaded (in torch too), it is ~50x slower on busy
    shared cores."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1, user_api="blas")


# ---- the mixture ----------------------------------------------------------------------------------------------------

class GaussianMixture:
    """weights [K], means [K, D], eigenvectors [K, D, r], eigenvalues [K, r], residual variances [K] (unused when
    r = D), classes [K] (the source class of each component, or None) and the image shape of one sample."""

    def __init__(self, weights: Tensor, means: Tensor, vecs: Tensor, vals: Tensor, res: Tensor,
                 classes: Tensor | None = None, sample_shape: Sequence[int] | None = None) -> None:
        f64 = dict(dtype=torch.float64)
        self.weights, self.means = weights.to(**f64) / weights.sum(), means.to(**f64)
        self.log_weights = self.weights.log()
        self.vecs, self.vals, self.res = vecs.to(**f64), vals.to(**f64), res.to(**f64)
        (self.components, self.dim), self.rank = self.means.shape, self.vals.shape[1]
        self.form = eigen_form(self.means, self.vecs, self.vals, self.res)  # once: every call reuses it
        self.classes = None if classes is None else classes.to(torch.int64)
        self.sample_shape = tuple(sample_shape) if sample_shape is not None else (self.dim,)
        if math.prod(self.sample_shape) != self.dim:
            raise ConfigError(f"sample_shape {self.sample_shape} does not hold {self.dim} values")
        if bool((self.vals <= 0).any()) or (self.rank < self.dim and bool((self.res <= 0).any())):
            raise ConfigError("covariance eigenvalues must be positive (use a variance floor)")

    def state(self) -> dict:
        """Tensors and settings (for torch.save with weights_only loading)."""
        return {"weights": self.weights, "means": self.means, "vecs": self.vecs, "vals": self.vals, "res": self.res,
                "classes": self.classes, "sample_shape": list(self.sample_shape)}

    def describe(self) -> dict:
        """Plain settings for reports."""
        return {"components": self.components, "dim": self.dim, "rank": self.rank,
                "covariance": "full" if self.rank == self.dim else "lowrank"}

    def _log_w(self, labels: Tensor | None, b: int) -> Tensor:
        log_w = self.log_weights[None].expand(b, -1)
        if labels is None:
            return log_w
        if self.classes is None:
            raise ConfigError("class labels given, but this mixture's components have no classes")
        keep = self.classes[None] == labels.reshape(-1, 1).cpu()
        if not bool(keep.any(1).all()):
            raise ConfigError(f"labels {sorted(set(labels.tolist()) - set(self.classes.tolist()))} match no "
                              f"component; accepted: {sorted(set(self.classes.tolist()))}")
        return torch.where(keep, log_w, -math.inf)

    def _flat(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], -1).to(device="cpu", dtype=torch.float64)

    def sample(self, n: int, generator: torch.Generator | None = None,
               labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """n exact samples [n, D] float64 and their component ids [n] (within each row's class when `labels`)."""
        probs = self.weights[None] if labels is None else _exp(self._log_w(labels, n))
        comp = torch.multinomial(probs, n if labels is None else 1, replacement=True, generator=generator).reshape(n)
        z = torch.randn(n, self.rank, generator=generator, dtype=torch.float64)
        zp = torch.randn(n, self.dim, generator=generator, dtype=torch.float64) if self.rank < self.dim else None
        x, sd, rsd = torch.empty(n, self.dim, dtype=torch.float64), self.vals.sqrt(), self.res.sqrt()
        for k in comp.unique().tolist():
            i, u = comp == k, self.vecs[k]
            x[i] = self.means[k] + (z[i] * sd[k]) @ u.T
            if zp is not None:
                x[i] += rsd[k] * (zp[i] - (zp[i] @ u) @ u.T)
        return x, comp

    def log_prob(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """Mixture log-density [B] at x [B, D] (the class-conditional one given labels)."""
        x = self._flat(x)
        logp, _ = component_log_densities(x, 0.0, self.form)
        return _logsumexp(self._log_w(labels, x.shape[0]) + logp)[:, 0]

    def responsibilities(self, x: Tensor, sigma: Tensor | float, labels: Tensor | None = None) -> Tensor:
        """p(component k | x) [B, K] at noise level sigma (scalar or [B])."""
        return self._posterior(x, sigma, labels)[1]

    def posterior_mean(self, x: Tensor, sigma: Tensor | float, labels: Tensor | None = None) -> Tensor:
        """The exact denoiser E[x0 | x0 + sigma eps = x] [B, D], sigma scalar or [B] (groundtruth.md §2)."""
        return self._posterior(x, sigma, labels)[0]

    def _posterior(self, x, sigma, labels):
        x = self._flat(x)
        return mixture_posterior_mean(x, sigma, self._log_w(labels, x.shape[0]), self.form)

    def score(self, x: Tensor, sigma: Tensor | float, labels: Tensor | None = None) -> Tensor:
        """grad log p_sigma(x) = (E[x0 | x] - x) / sigma^2 [B, D]."""
        x = self._flat(x)
        return (self.posterior_mean(x, sigma, labels) - x) / _sigma2(sigma)

    def ode_trajectory(self, x_start: Tensor, sigmas: Sequence[float], steps: int = ODE_STEPS,
                       labels: Tensor | None = None) -> Tensor:
        """Exact probability-flow ODE states [M, B, D] at the decreasing `sigmas`, from x_start at sigmas[0]:
        dx/dsigma = (x - D(x; sigma)) / sigma, solved by RK4 in log sigma (groundtruth.md §3)."""
        check_positive("steps", steps)
        sig = [float(s) for s in sigmas]
        if any(s <= 0 for s in sig) or any(b >= a for a, b in zip(sig, sig[1:])):
            raise ConfigError(f"sigmas must be positive and decreasing, got {sig}")
        return rk4_log_sigma(lambda x, s: x - self.posterior_mean(x, s, labels), self._flat(x_start), sig, steps)

    def ode_solution(self, x_T: Tensor, sigma_max: float, sigma_min: float = 0.002, steps: int = ODE_STEPS,
                     labels: Tensor | None = None) -> Tensor:
        """The ODE's end point [B, D]: the state at sigma_min, denoised once, D(x(sigma_min); sigma_min), which is
        where the samplers land as their steps grow; sigma_min = 0 is read as 1e-6 (groundtruth.md §3)."""
        lo = float(sigma_min) or 1e-6
        x = self.ode_trajectory(x_T, [float(sigma_max), lo], steps, labels)[-1]
        return self.posterior_mean(x, lo, labels)


class ExactDenoiser(nn.Module):
    """The mixture's exact denoiser with the `Denoiser` call signature (x, level, labels) -> x0, for the samplers
    and the metrics; levels are EDM sigmas. `conditional` uses the labels (components of that class only)."""

    def __init__(self, gmm: GaussianMixture, formulation=None, conditional: bool = False) -> None:
        super().__init__()
        from .formulations import EDMFormulation
        self.gmm, self.formulation = gmm, formulation or EDMFormulation()
        if self.formulation.name != "edm":
            raise ConfigError(f"the exact denoiser takes EDM sigma levels; formulation {self.formulation.name!r} "
                              f"is not accepted (accepted: edm)")
        self.conditional = bool(conditional)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.gmm.sample_shape

    def forward(self, x: Tensor, level: Tensor | float, labels: Tensor | None = None) -> Tensor:
        out = self.gmm.posterior_mean(x, level, labels if self.conditional else None)
        return out.to(device=x.device, dtype=x.dtype).reshape(x.shape)


# ---- fitting ----------------------------------------------------------------------------------------------------

def _top_eigen(x: Tensor, r: int, g: torch.Generator, iters: int = 6) -> tuple[Tensor, Tensor]:
    """Top-r eigenvalues [r] and eigenvectors [D, r] of x^T x by seeded subspace iteration."""
    a, q = x.numpy(), torch.randn(x.shape[1], r + 16, generator=g, dtype=x.dtype).numpy()
    with _one_blas_thread():
        q = np.linalg.qr(q)[0]
        for _ in range(iters):
            q = np.linalg.qr(a.T @ (a @ q))[0]
        b = a @ q
        vals, v = np.linalg.eigh(b.T @ b)
    return torch.from_numpy(vals[::-1][:r].copy()).clamp_min(0), torch.from_numpy((q @ v[:, ::-1])[:, :r].copy())


def _m_step(x: Tensor, resp: Tensor, rank: int, floor: float, g: torch.Generator) -> tuple[Tensor, ...]:
    """Weights, means, eigenvectors, eigenvalues, residuals maximising the expected log-likelihood (PPCA for r < D)."""
    n, d = x.shape
    nk = resp.sum(0).clamp_min(1e-10)
    means = (resp.T @ x) / nk[:, None]
    vecs, vals, res = [], [], []
    root = (resp / nk).sqrt()
    for k in range(resp.shape[1]):
        rows = resp[:, k] > 1e-8
        xk = (x[rows] - means[k]) * root[rows, k, None]
        if rank == d:
            with _one_blas_thread():
                lam, u = map(torch.from_numpy, np.linalg.eigh((xk.T @ xk).numpy()))
            vecs.append(u), vals.append(lam.clamp_min(0) + floor), res.append(torch.tensor(0.0, dtype=x.dtype))
        else:
            lam, u = _top_eigen(xk, rank, g)
            rest = ((xk * xk).sum() - lam.sum()).clamp_min(0) / (d - rank)
            vecs.append(u), vals.append(lam.clamp_min(rest) + floor), res.append(rest + floor)
    return nk / n, means, torch.stack(vecs), torch.stack(vals), torch.stack(res)


def _init_resp(x: Tensor, components: int, seed: int, labels: Tensor | None) -> Tensor:
    """Hard k-means responsibilities [N, K]; within each class (K / C clusters each) when labels split K evenly."""
    from sklearn.cluster import KMeans

    ids = torch.zeros(x.shape[0], dtype=torch.int64)
    classes = [] if labels is None else labels.unique().tolist()
    groups = [(c, labels == c) for c in classes] if classes and components % len(classes) == 0 else []
    per = components // max(len(groups), 1)
    for j, (_, rows) in enumerate(groups or [(None, torch.ones(x.shape[0], dtype=torch.bool))]):
        sub = KMeans(per, n_init=1, random_state=seed).fit_predict(x[rows].float().numpy()) if per > 1 else 0
        ids[rows] = j * per + torch.as_tensor(sub, dtype=torch.int64)
    return torch.nn.functional.one_hot(ids, components).to(torch.float64)


def fit_gmm(x: Tensor, components: int, covariance: str = "full", rank: int | None = None, seed: int = 0,
            iterations: int = 30, floor: float = 1e-3, labels: Tensor | None = None) -> GaussianMixture:
    """Fit a mixture to x [N, ...] (flattened): k-means, then EM (groundtruth.md §1). "full" covariances get `floor`
    added to every eigenvalue (scikit-learn's reg_covar); "lowrank" keeps the top `rank` eigen-directions plus an
    isotropic residual (each floored the same way). With `labels` [N], each component takes the class most of its
    responsibility comes from."""
    check_choice("covariance", covariance, COVARIANCES)
    check_positive("components", components)
    flat = x.reshape(x.shape[0], -1).to(torch.float64)
    d = flat.shape[1]
    rank = d if covariance == "full" else rank
    if covariance == "lowrank" and not (isinstance(rank, int) and 0 < rank < d):
        raise ConfigError(f"lowrank covariance needs an integer rank in [1, {d - 1}], got {rank!r}")
    if flat.shape[0] < 2 * components:
        raise ConfigError(f"{flat.shape[0]} points cannot fit {components} components; need >= {2 * components}")
    g = torch.Generator().manual_seed(seed)
    resp = _init_resp(flat, components, seed, labels)
    last = -math.inf
    for _ in range(iterations):
        w, mu, u, lam, res = _m_step(flat, resp, rank, floor, g)
        logp, _ = component_log_densities(flat, 0.0, eigen_form(mu, u, lam, res))
        joint = w.log() + logp
        ll = float(_logsumexp(joint).mean())
        resp = _softmax(joint)
        if ll - last < 1e-4 * d:
            break
        last = ll
    classes = None
    if labels is not None:
        hist = resp.T @ torch.nn.functional.one_hot(labels.to(torch.int64)).to(torch.float64)
        classes = hist.argmax(1)
    return GaussianMixture(w, mu, u, lam, res, classes=classes, sample_shape=tuple(x.shape[1:]))


def fitted_mixture(source, components: int, covariance: str, rank: int | None, folder: str,
                   seed: int = 0) -> GaussianMixture:
    """`fit_gmm` of a `Dataset`'s images and labels, cached in `folder` by content hash and settings."""
    from .runs import atomic_save

    key = f"{source.content_hash()}-{covariance}-{components}-{rank}-{seed}-v{VERSION}"
    path = os.path.join(folder, f"{source.name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt")
    if os.path.isfile(path):
        try:
            s = torch.load(path, weights_only=True)
            return GaussianMixture(s["weights"], s["means"], s["vecs"], s["vals"], s["res"], s["classes"],
                                   s["sample_shape"])
        except (OSError, RuntimeError, KeyError, EOFError):
            pass  # a damaged cache file is refitted and replaced
    gmm = fit_gmm(source.x, components, covariance, rank, seed, labels=source.labels)
    atomic_save(gmm.state(), path)
    return gmm


def parse_gmm_name(name: str) -> tuple[str, dict, bool]:
    """"gmm:<source>[:key=value...][:finite]" -> (source, fit settings, finite) (groundtruth.md §4): keys components,
    covariance, rank; `finite` trains on the data set's fixed draw instead of fresh samples."""
    parts = name.split(":")
    source = parts[1] if len(parts) > 1 else ""
    if source not in SOURCES:
        raise ConfigError(f"unknown ground-truth data set {name!r}; accepted: "
                          f"{', '.join('gmm:' + s for s in SOURCES)} (options :components=K:covariance=C:rank=R, "
                          f":finite)")
    opts, finite = dict(SOURCES[source]), False
    for item in parts[2:]:
        if item == "finite":
            finite = True
            continue
        key, _, value = item.partition("=")
        if key not in opts or not (value.isdigit() or key == "covariance" and value):
            raise ConfigError(f"data set {name!r}: bad option {item!r}; accepted: components=K, "
                              f"covariance={'|'.join(COVARIANCES)}, rank=R (K, R positive integers), finite")
        opts[key] = value if key == "covariance" else int(value)
    if opts["covariance"] == "full":
        opts["rank"] = None
    return source, opts, finite
