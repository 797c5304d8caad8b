"""Certified removal for an L2-regularised logistic-regression head on fixed features.

Source: Guo, Goldstein, Hannun and van der Maaten, "Certified Data Removal from
Machine Learning Models", ICML 2020.

Training minimises the perturbed objective

    L_b(w; D) = sum_i log(1 + exp(-y_i w^T x_i)) + lam * n / 2 * ||w||^2 + b^T w,

with labels y in {-1, +1}, features scaled to unit L2 norm and b ~ N(0, sigma^2 I).
Removing a set R of m rows takes one Newton step on the remaining data D':

    Delta = lam * m * w + sum_{j in R} grad l(w; x_j, y_j),   H = hessian of L(w; D') at w,
    w <- w + H^{-1} Delta.

The gradient residual ||grad L_b(w_new; D')|| of the result is at most
gamma * ||X'||_2 * ||H^{-1} Delta|| * ||X' H^{-1} Delta|| (the data-dependent bound of
Guo et al.), where X' is the remaining feature matrix and gamma = 1/4 bounds the
Lipschitz constant of the logistic loss's second derivative as the paper uses it.
Their Theorem 3: if the accumulated residual stays at most eps', noise with
sigma = c * eps' / epsilon and c = sqrt(2 log(1.5 / delta)) makes the removals
(epsilon, delta)-certified. So a head built with sigma can absorb removals while the
summed bounds stay within the budget sigma * epsilon / c. A removal that would exceed
it retrains the head from scratch on the remaining rows with fresh noise instead,
which resets the budget.

The guarantee covers the head given its features. `CertifiedMLP` takes its features
from a trained TabularMLP, whose weights and scaler saw the training data, forget
rows included, so for Lethe the certificate applies to the head only.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from models.data import Split
from models.network import TabularMLP

logger = logging.getLogger(__name__)

# Guo et al. bound the logistic loss's third derivative by 1/4 (their code divides by 4).
# The exact supremum of |sigma'(z)(1 - 2 sigma(z))| is 1 / (6 sqrt(3)), about 0.096, so the bound is conservative.
HESSIAN_LIPSCHITZ = 0.25


@dataclass(frozen=True)
class CertifiedConfig:
    """Regularisation, noise and privacy target of a CertifiedHead."""

    # lam in the objective above: the L2 term is lam * n / 2 * ||w||^2 for n training rows.
    lam: float = 1e-3
    epsilon: float = 1.0
    delta: float = 1e-4
    # Standard deviation sigma of each coordinate of the objective perturbation b.
    noise_std: float = 10.0
    seed: int = 0
    max_iterations: int = 100
    # Training stops when the gradient norm of L_b is at most this. The residual left is charged to the budget.
    tolerance: float = 1e-9

    def __post_init__(self) -> None:
        for name in ("lam", "epsilon", "noise_std", "tolerance"):
            if getattr(self, name) <= 0:
                raise ValueError(f"CertifiedConfig.{name} must be positive, got {getattr(self, name)}.")
        if not 0.0 < self.delta < 1.0:
            raise ValueError(f"CertifiedConfig.delta must be in (0, 1), got {self.delta}.")
        if self.max_iterations < 1:
            raise ValueError(f"CertifiedConfig.max_iterations must be at least 1, got {self.max_iterations}.")

    @property
    def noise_multiplier(self) -> float:
        """c = sqrt(2 log(1.5 / delta)) of Guo et al.'s Theorem 3."""
        return math.sqrt(2.0 * math.log(1.5 / self.delta))

    @property
    def residual_budget(self) -> float:
        """The largest accumulated gradient residual sigma * epsilon / c that keeps the (epsilon, delta) guarantee."""
        return self.noise_std * self.epsilon / self.noise_multiplier


@dataclass(frozen=True)
class RemovalReport:
    """Outcome of one `CertifiedHead.remove` call.

    `residual_bound` is the bound of the Newton step, computed even when the step was
    discarded. `retrained` is True when that bound would have exceeded the budget,
    so the head was retrained from scratch on the remaining rows with fresh noise.
    """

    n_removed: int
    retrained: bool
    residual_bound: float
    residual_used: float
    residual_budget: float
    newton_iterations: int
    wall_time_s: float


def objective(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor, lam: float, noise: torch.Tensor) -> torch.Tensor:
    """Return L_b(w; D) for features `x` (n, d), labels `y` in {-1, +1} and perturbation `noise`."""
    return F.softplus(-y * (x @ w)).sum() + lam * len(y) / 2.0 * w.dot(w) + noise.dot(w)


def loss_gradient(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Return the gradient of sum_i log(1 + exp(-y_i w^T x_i)) (no regularisation, no noise)."""
    return x.T @ (-y * torch.sigmoid(-y * (x @ w)))


def objective_gradient(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor, lam: float, noise: torch.Tensor) -> torch.Tensor:
    """Return the gradient of L_b(w; D)."""
    return loss_gradient(w, x, y) + lam * len(y) * w + noise


def objective_hessian(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor, lam: float) -> torch.Tensor:
    """Return the Hessian of L_b(w; D): X^T diag(s (1 - s)) X + lam * n * I, with s = sigmoid(X w)."""
    probabilities = torch.sigmoid(x @ w)
    weights = probabilities * (1.0 - probabilities)
    hessian = x.T @ (weights[:, None] * x)
    hessian.diagonal().add_(lam * len(y))
    return hessian


def spectral_norm_from_gram(gram: torch.Tensor) -> float:
    """Return ||X||_2, the largest singular value of X, from its d x d Gram matrix X^T X."""
    return math.sqrt(max(float(torch.linalg.eigvalsh(gram).max()), 0.0))


def minimize(x: torch.Tensor, y: torch.Tensor, config: CertifiedConfig, noise: torch.Tensor) -> tuple[torch.Tensor, int, float]:
    """Minimise L_b(w; D) by Newton's method with backtracking, from w = 0.

    Returns the weights, the number of Newton iterations and the final gradient norm.
    The objective is strongly convex (lam > 0), so the iteration converges from any start.
    """
    w = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    gradient = objective_gradient(w, x, y, config.lam, noise)
    iterations = 0
    while float(gradient.norm()) > config.tolerance and iterations < config.max_iterations:
        direction = torch.linalg.solve(objective_hessian(w, x, y, config.lam), gradient)
        current = objective(w, x, y, config.lam, noise)
        step = 1.0
        # Armijo backtracking: halve until the objective falls by a fraction of the predicted decrease.
        while step > 1e-10 and objective(w - step * direction, x, y, config.lam, noise) > current - 1e-4 * step * gradient.dot(direction):
            step /= 2.0
        w = w - step * direction
        gradient = objective_gradient(w, x, y, config.lam, noise)
        iterations += 1

    if float(gradient.norm()) > config.tolerance:
        logger.warning("Newton's method stopped after %d iterations with gradient norm %.3g above the tolerance %.3g.",
                       iterations, float(gradient.norm()), config.tolerance)
    return w, iterations, float(gradient.norm())


def signed_labels(labels: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Map labels in {0, 1} to {-1, +1} as float64."""
    # torch.tensor copies, so a read-only array from pandas raises no warning.
    return torch.tensor(np.asarray(labels), dtype=torch.float64, device=device) * 2.0 - 1.0


class CertifiedHead(nn.Module):
    """Logistic-regression weights with the noise, budget and counters of certified removal.

    Buffers: `weight` and `noise` (float64, one value per feature), `gram` (X^T X of
    the current training rows, d x d, stored so a removal needs no pass over the data
    for ||X'||_2), `residual_used` (the accumulated gradient-residual bound since the
    last training), `n_train`, `removals` and `retrains`. They are buffers, so saving
    the module saves the state that later removals need.
    """

    def __init__(self, n_features: int, config: CertifiedConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("weight", torch.zeros(n_features, dtype=torch.float64))
        self.register_buffer("noise", torch.zeros(n_features, dtype=torch.float64))
        self.register_buffer("gram", torch.zeros(n_features, n_features, dtype=torch.float64))
        self.register_buffer("residual_used", torch.zeros((), dtype=torch.float64))
        self.register_buffer("n_train", torch.zeros((), dtype=torch.int64))
        self.register_buffer("removals", torch.zeros((), dtype=torch.int64))
        self.register_buffer("retrains", torch.zeros((), dtype=torch.int64))

    def draw_noise(self) -> None:
        """Draw b ~ N(0, noise_std^2 I) from a generator seeded by (seed, retrains), so each retraining gets fresh noise."""
        seed = int(np.random.SeedSequence([self.config.seed, int(self.retrains)]).generate_state(1)[0])
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(self.noise.shape, generator=generator, dtype=torch.float64) * self.config.noise_std
        self.noise.copy_(noise.to(self.noise.device))

    def fit(self, features: torch.Tensor, labels: torch.Tensor) -> int:
        """Minimise L_b on `features` (n, d) and signed `labels`, reset the budget, and return the Newton iterations.

        The noise must already be drawn. The training residual counts against the budget.
        """
        weight, iterations, residual = minimize(features, labels, self.config, self.noise)
        self.weight.copy_(weight)
        self.gram.copy_(features.T @ features)
        self.residual_used.fill_(residual)
        self.n_train.fill_(len(labels))
        return iterations

    def remove(self, removed: torch.Tensor, removed_labels: torch.Tensor, remaining: torch.Tensor, remaining_labels: torch.Tensor) -> RemovalReport:
        """Remove rows by one Newton step, or retrain with fresh noise when the budget would be exceeded.

        `removed` and `remaining` are the normalised features of the rows to remove and of
        all remaining training rows. Raises ValueError when their counts do not add up
        to the rows the head was trained on, because the Newton step and its bound
        hold only for the exact remaining data.
        """
        started = time.perf_counter()
        if len(removed) + len(remaining) != int(self.n_train):
            raise ValueError(
                f"The head was trained on {int(self.n_train)} rows, but {len(removed)} removed and {len(remaining)} remaining rows "
                "were passed. Pass every remaining training row."
            )
        if len(remaining) == 0:
            raise ValueError("Removing every training row leaves nothing to fit the head on.")

        lam = self.config.lam
        budget = self.config.residual_budget
        delta = lam * len(removed_labels) * self.weight + loss_gradient(self.weight, removed, removed_labels)
        step = torch.linalg.solve(objective_hessian(self.weight, remaining, remaining_labels, lam), delta)
        remaining_gram = self.gram - removed.T @ removed
        bound = HESSIAN_LIPSCHITZ * spectral_norm_from_gram(remaining_gram) * float(step.norm()) * float((remaining @ step).norm())

        retrained = float(self.residual_used) + bound > budget
        iterations = 1
        if retrained:
            logger.info("The removal's residual bound %.4g would exceed the budget left (%.4g of %.4g), so the head is retrained.",
                        bound, budget - float(self.residual_used), budget)
            self.retrains += 1
            self.draw_noise()
            iterations = self.fit(remaining, remaining_labels)
        else:
            self.weight += step
            self.gram.copy_(remaining_gram)
            self.residual_used += bound
            self.n_train.fill_(len(remaining_labels))
        self.removals += 1

        return RemovalReport(
            n_removed=len(removed_labels),
            retrained=retrained,
            residual_bound=bound,
            residual_used=float(self.residual_used),
            residual_budget=budget,
            newton_iterations=iterations,
            wall_time_s=time.perf_counter() - started,
        )

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Return two-class logits (-s / 2, s / 2) with s = features @ weight, so softmax gives sigmoid(s) for class 1."""
        score = features @ self.weight
        return torch.stack([-score / 2.0, score / 2.0], dim=1)

    def describe(self) -> dict:
        """Return the configuration, the budget state and the guarantee as JSON-compatible values."""
        budget = self.config.residual_budget
        return {
            **asdict(self.config),
            "residual_used": float(self.residual_used),
            "residual_budget": budget,
            "budget_left": budget - float(self.residual_used),
            "removals": int(self.removals),
            "retrains": int(self.retrains),
            "guarantee": f"({self.config.epsilon}, {self.config.delta})-certified removal for the head",
        }


class CertifiedMLP(nn.Module):
    """A frozen TabularMLP feature extractor (all layers but the last) followed by a CertifiedHead.

    The head's input is the last hidden layer's output with a constant 1 appended
    (the bias), scaled to unit L2 norm as in Guo et al.'s experiments. Dropout layers of
    the extractor are skipped, so the features do not depend on train or eval mode.
    """

    def __init__(self, extractor: TabularMLP, config: CertifiedConfig) -> None:
        super().__init__()
        self.extractor = copy.deepcopy(extractor).eval()
        for parameter in self.extractor.parameters():
            parameter.requires_grad_(False)
        n_features = self.extractor.hidden[-1] + 1 if self.extractor.hidden else self.extractor.n_features + 1
        self.head = CertifiedHead(n_features, config)

    @property
    def n_features(self) -> int:
        """Number of raw input features."""
        return self.extractor.n_features

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Return the head's float64 features of raw inputs `x`, one unit-norm row per input."""
        hidden = self.extractor.standardize(x)
        for layer in list(self.extractor.layers)[:-1]:
            if not isinstance(layer, nn.Dropout):
                hidden = layer(hidden)
        hidden = hidden.to(torch.float64)
        with_bias = torch.cat([hidden, torch.ones(len(hidden), 1, dtype=torch.float64, device=hidden.device)], dim=1)
        return with_bias / with_bias.norm(dim=1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return float32 class logits of shape (N, 2) for raw features of shape (N, n_features)."""
        return self.head.logits(self.embed(x)).float()

    def fit(self, train: Split, device: torch.device) -> int:
        """Draw fresh noise and fit the head on `train`. Returns the Newton iterations."""
        self.to(device)
        self.head.draw_noise()
        features = self.embed(torch.tensor(train.x, device=device))
        return self.head.fit(features, signed_labels(train.y, device))

    def remove(self, forget: Split, retain: Split, device: torch.device) -> RemovalReport:
        """Remove the `forget` rows from the head, given every remaining training row in `retain`."""
        self.to(device)
        return self.head.remove(
            self.embed(torch.tensor(forget.x, device=device)),
            signed_labels(forget.y, device),
            self.embed(torch.tensor(retain.x, device=device)),
            signed_labels(retain.y, device),
        )


def certify_mlp(model: TabularMLP, train: Split, config: CertifiedConfig, device: torch.device) -> CertifiedMLP:
    """Build a CertifiedMLP on the frozen features of `model` and fit its head on `train`."""
    if len(train) == 0:
        raise ValueError("The training split is empty.")
    certified = CertifiedMLP(model, config)
    iterations = certified.fit(train, device)
    logger.info("Fitted a certified head on %d rows in %d Newton iterations.", len(train), iterations)
    return certified.eval()
