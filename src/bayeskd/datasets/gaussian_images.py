"""`gaussian_images`: synthetic CIFAR-format images whose Bayes class probability p*(y|x) is exact.

The generative model, for K classes with a uniform prior:

    y ~ uniform{0..K-1};  component c ~ uniform over the class's 2M components
    z ~ N(mu_{y,c}, s^2 I_d)                      a point in a d-dimensional latent space
    x = W z + b + sigma * eps,  eps ~ N(0, I_D)   the image, D = channels * size * size pixels

- Each class has M random modes mu ~ N(0, I_d), so the class boundaries are not linear and a CNN has
  something to learn (and, on a small training split, to overfit).
- The decoder W (D x d) is fixed and random: its columns are spatially smooth random fields (white
  noise blurred with a Gaussian of std `smoothness` pixels, independently per channel) that fade to 0
  within `margin` pixels of the border, made orthogonal, each of norm a. b = 0.5 (mid grey).
- Half of the fields are left-right mirror-symmetric and half antisymmetric, and every mode mu comes
  with its mirror image S mu (S: -1 on the antisymmetric coordinates), so the model is exactly
  invariant under a horizontal flip, p*(y|flip(x)) = p*(y|x): the flip of the standard augmentation
  keeps the label's distribution. Crops (shifts, zero padding) do not: p* is defined and evaluated on
  the un-augmented images. Zero padding up to `margin` pixels lands where the fields are 0, so a crop
  only shifts the pattern; the Bayes rule argmax p* still reads most views right at padding 1-2 and
  far fewer at 4 (README, "gaussian_images").
- Per component, x is Gaussian with mean W mu + b and covariance s^2 W W^T + sigma^2 I, rank d plus
  isotropic. Its log density is computed exactly in float64 through the Woodbury identity and the
  matrix determinant lemma (`ImageModel.log_densities`, O(N D d)); p*(y|x) is the class-normalised
  sum over each class's components (`ImageModel.posterior`). It depends on x only through
  W^T (x - b): the rest of the image is noise.

Difficulty: W^T W = a^2 I, so the Bayes rule sees the latent mixture with isotropic noise of std
sqrt(s^2 + sigma^2 / a^2); that std is calibrated (bisection on a Monte Carlo sample of the latent
problem, `calibrate`) so that the Bayes accuracy is `bayes_accuracy`. The accuracy realised on the
test split is `info["bayes_accuracy"]`. `contrast` (the largest RMS deviation of a noise-free pixel
from b) sets a, `pixel_noise` sets sigma, and s follows.

Stored inputs. The images are stored as uint8 like every image dataset (`data.save`): rounded to
k/255 and clipped to [0, 1]. p* is computed on the stored image (the float32 k/255 values the nets
see, in float64): it is the posterior of the continuous model at the stored image. Rounding adds an
error of variance (1/255)^2/12 per pixel to the pixel noise; `info["gaussian_images"]["quantisation"]`
measures on the test split how much rounding moves p* and the distance from p* to the posterior with
that variance added (the posterior of the rounded image, to first order). The contrast keeps pixels
well inside [0, 1]: clipping, which would leave the model, is counted, and generation stops when more
than `MAX_CLIPPED` of the pixel values were clipped.

Generation is chunked (`CHUNK` images at a time), each chunk from its own random stream keyed by
(seed, split, chunk): memory stays bounded, the test split does not depend on n_train, and a
smaller training split is a prefix of a larger one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Annotated

import numpy as np
from pydantic import Field, model_validator

from bayeskd.datasets.base import DataError, Dataset, Split
from bayeskd.declare import Fraction, PositiveInt, Section, bounded, dataset

CHUNK = 2000  # images generated at a time
OFFSET = 0.5  # b: mid grey
MAX_CLIPPED = 1e-5  # the largest share of pixel values that may be clipped to [0, 1]
CALIBRATION_SAMPLES = 40_000  # latent draws that estimate the Bayes accuracy during calibration
IMAGES_WHY = "more is taken for a typo (CIFAR has 50,000 training images)"


class GaussianImages(Section):
    """The generative model's parameters (see the module docstring)."""

    n_train: bounded(1, 1_000_000, IMAGES_WHY)
    n_val: bounded(0, 1_000_000, IMAGES_WHY)  # 0: no validation split
    n_test: bounded(1, 1_000_000, IMAGES_WHY)
    n_classes: Annotated[int, Field(ge=2)]
    channels: PositiveInt
    image_size: PositiveInt
    latent_dim: PositiveInt
    modes_per_class: PositiveInt
    bayes_accuracy: Fraction  # the target; the latent spread is calibrated to it
    smoothness: Annotated[float, Field(ge=0)]  # blur std of the decoder's fields, in pixels
    margin: Annotated[int, Field(ge=0)]  # the fields are 0 this close to the border
    contrast: Annotated[float, Field(gt=0, lt=0.5)]  # largest RMS deviation of a noise-free pixel from 0.5
    pixel_noise: Annotated[float, Field(gt=0)]

    @model_validator(mode="after")
    def _feasible(self) -> GaussianImages:
        if self.bayes_accuracy <= 1 / self.n_classes:
            raise ValueError(f"bayes_accuracy = {self.bayes_accuracy}: must be above chance, "
                             f"1/n_classes = {1 / self.n_classes:.4g}")
        for split in ("n_train", "n_val", "n_test"):
            n = getattr(self, split)
            if 0 < n < self.n_classes:
                raise ValueError(f"{split} = {n}: a split needs at least n_classes = {self.n_classes} images "
                                 "(the data validation expects every class in every split)"
                                 + ("; 0 for none" if split == "n_val" else ""))
        if 2 * self.margin + 1 >= self.image_size:
            raise ValueError(f"margin = {self.margin} leaves no pixels of a {self.image_size}-pixel image "
                             "to the decoder's fields; use less than (image_size - 1) / 2")
        return self


def logsumexp(a: np.ndarray, axis: int, keepdims: bool = False) -> np.ndarray:
    """log(sum(exp(a))) along `axis`, stable (scipy's is several times slower on these shapes)."""
    m = a.max(axis, keepdims=True)
    out = np.log(np.exp(a - m).sum(axis, keepdims=True)) + m
    return out if keepdims else out.squeeze(axis)


@dataclass(frozen=True)
class ImageModel:
    """x = W z + b + sigma * eps with z from a Gaussian mixture per class (see the module docstring)."""

    decoder: np.ndarray  # W, (D, d) float64
    means: np.ndarray  # (K, C, d): the latent means of each class's C components
    latent_std: float  # s
    pixel_noise: float  # sigma
    shape: tuple[int, int, int]  # (channels, height, width); D = their product
    offset: float = OFFSET  # b, the same for every pixel

    @property
    def num_classes(self) -> int:
        return self.means.shape[0]

    def log_densities(self, x: np.ndarray) -> np.ndarray:
        """log N(x; W mu + b, s^2 W W^T + sigma^2 I) for every image (rows of x, any float dtype, any
        shape (N, ...) with D values per image) and every component: (N, K, C), float64.

        Woodbury: C^-1 = sigma^-2 (I - W A^-1 W^T) with A = (sigma^2/s^2) I + W^T W, and the
        determinant lemma: log det C = D log sigma^2 + log det(I + (s^2/sigma^2) W^T W)."""
        W, mu = self.decoder, self.means.reshape(-1, self.decoder.shape[1])  # (D, d), (KC, d)
        D, d = W.shape
        s2, v = self.latent_std**2, self.pixel_noise**2
        G = W.T @ W
        A = (v / s2) * np.eye(d) + G
        chol = np.linalg.cholesky(A)
        r = x.reshape(len(x), D).astype(np.float64) - self.offset  # (N, D)
        u = r @ W  # (N, d): all the model needs of the image
        r2 = np.einsum("nd,nd->n", r, r)
        ainv = lambda m: np.linalg.solve(chol.T, np.linalg.solve(chol, m))  # noqa: E731
        Ainv_u = ainv(u.T).T  # (N, d)
        Gmu = mu @ G  # (KC, d)
        Ainv_Gmu = ainv(Gmu.T).T  # (KC, d)
        # (r - W mu)^T C^-1 (r - W mu) * sigma^2
        #   = |r|^2 - 2 u.mu + mu^T G mu - (u - G mu)^T A^-1 (u - G mu)
        quad = ((r2 - np.einsum("nd,nd->n", u, Ainv_u))[:, None]
                - 2 * u @ mu.T + 2 * Ainv_u @ Gmu.T
                + (np.einsum("kd,kd->k", mu, Gmu) - np.einsum("kd,kd->k", Gmu, Ainv_Gmu))[None])
        logdet = D * np.log(v) + 2 * np.log(np.diag(chol)).sum() - d * np.log(v / s2)
        out = -0.5 * (quad / v + logdet + D * np.log(2 * np.pi))
        return out.reshape(len(x), *self.means.shape[:2])

    def posterior(self, x: np.ndarray) -> np.ndarray:
        """p*(y|x): (N, K) float64, rows summing to 1. Uniform class prior and uniform weights over
        each class's components."""
        joint = logsumexp(self.log_densities(x), axis=2)  # log p(x|y) + const, (N, K)
        return np.exp(joint - logsumexp(joint, axis=1, keepdims=True))

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """n continuous images (n, channels, height, width) float32, unclipped, and their labels."""
        K, C, d = self.means.shape
        y = rng.integers(0, K, n)
        comp = rng.integers(0, C, n)
        z = self.means[y, comp] + self.latent_std * rng.standard_normal((n, d))
        noise = rng.standard_normal((n, self.decoder.shape[0]), dtype=np.float32)
        x = (z @ self.decoder.T + self.offset).astype(np.float32) + np.float32(self.pixel_noise) * noise
        return x.reshape(n, *self.shape), y

    def flip_signs(self) -> np.ndarray:
        """S: +1 for mirror-symmetric decoder fields, -1 for antisymmetric ones (flip(W z) = W S z)."""
        return flip_signs(self.decoder, self.shape)

    def normalize(self) -> dict[str, list[float]]:
        """Per-channel mean and std of the images under the model (exact, not estimated from a
        split, so they do not change with the split sizes)."""
        K, C, d = self.means.shape
        mu = self.means.reshape(-1, d)
        m, cov = mu.mean(0), np.cov(mu.T, bias=True) + self.latent_std**2 * np.eye(d)
        W = self.decoder.reshape(self.shape[0], -1, d)  # (channels, pixels, d)
        pixel_mean = self.offset + W @ m  # (channels, pixels)
        pixel_var = np.einsum("cpd,de,cpe->cp", W, cov, W) + self.pixel_noise**2
        mean = pixel_mean.mean(1)
        var = (pixel_var + pixel_mean**2).mean(1) - mean**2
        return {"mean": mean.tolist(), "std": np.sqrt(var).tolist()}


def flip_signs(decoder: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """+1 for each mirror-symmetric column of `decoder`, -1 for each antisymmetric one."""
    fields = decoder.reshape(*shape, -1)
    return np.sign(np.einsum("chwd,chwd->d", fields, fields[:, :, ::-1]))


def window(n: int, margin: int) -> np.ndarray:
    """0 within `margin` pixels of either end, 1 in the middle, a raised-cosine ramp of `margin`
    pixels between."""
    if margin == 0:
        return np.ones(n)
    dist = np.minimum(np.arange(n), np.arange(n)[::-1]) + 0.5  # distance of pixel centres to the edge
    ramp = np.clip((dist - margin) / margin, 0, 1)
    return np.sin(np.pi / 2 * ramp) ** 2


def smooth_fields(rng: np.random.Generator, shape: tuple[int, int, int], d: int,
                  smoothness: float, margin: int = 0) -> np.ndarray:
    """d orthonormal columns (D, d): blurred white noise, half of them mirror-symmetric (left-right),
    half antisymmetric."""
    from scipy.ndimage import gaussian_filter

    c, h, w = shape
    pad = int(np.ceil(4 * smoothness))  # blur a larger field and keep its centre: no edge effects
    noise = rng.standard_normal((d, c, h + 2 * pad, w + 2 * pad))
    fields = gaussian_filter(noise, sigma=(0, 0, smoothness, smoothness), mode="wrap")
    fields = fields[:, :, pad:pad + h, pad:pad + w]
    fields = fields * window(h, margin)[:, None] * window(w, margin)[None]
    mirrored = fields[..., ::-1]
    parity = np.where(np.arange(d) % 2 == 0, 1.0, -1.0)[:, None, None, None]
    fields = (fields + parity * mirrored) / 2
    # symmetric and antisymmetric fields are orthogonal to each other, so QR keeps each one's parity
    q, r = np.linalg.qr(fields.reshape(d, -1).T)
    if np.abs(np.diag(r)).min() < 1e-6 * np.abs(np.diag(r)).max():
        raise DataError(f"latent_dim = {d} fields are not independent on {shape} images with margin "
                        f"{margin}; use fewer latent dimensions or larger images")
    return q


class _LatentProblem:
    """The latent Bayes accuracy as a function of the noise std on fixed draws, fast: with
    zhat = mu_i + t e, |zhat - mu_j|^2 = |mu_i - mu_j|^2 + 2 t e.(mu_i - mu_j) + t^2 |e|^2, and the last
    term is the same for every j."""

    def __init__(self, means: np.ndarray, base: tuple[np.ndarray, ...]):
        y, comp, e = base
        self.shape, self.y = means.shape, y
        mu = means.reshape(-1, means.shape[2])
        sq = (mu**2).sum(1)
        own = y * means.shape[1] + comp  # the drawn component's row in mu
        self.dist2 = (sq[:, None] - 2 * mu @ mu.T + sq[None])[own].astype(np.float32)  # (n, KC)
        self.cross = ((e * mu[own]).sum(1)[:, None] - e @ mu.T).astype(np.float32)

    def accuracy(self, noise_std: float) -> float:
        t = np.float32(noise_std)
        logits = -(self.dist2 + 2 * t * self.cross) / (2 * t * t)
        joint = logsumexp(logits.reshape(len(self.y), *self.shape[:2]), axis=2)
        return float((joint.argmax(1) == self.y).mean())


def calibrate(means: np.ndarray, target: float, rng: np.random.Generator) -> float:
    """The isotropic latent noise std at which the Bayes accuracy is `target`, by bisection on a
    fixed Monte Carlo sample (common random numbers make the estimate a smooth function)."""
    K, C, d = means.shape
    n = CALIBRATION_SAMPLES
    problem = _LatentProblem(means, (rng.integers(0, K, n), rng.integers(0, C, n),
                                     rng.standard_normal((n, d))))
    lo, hi = np.log(1e-3), np.log(1e3)
    if problem.accuracy(np.exp(lo)) < target:
        raise DataError(f"bayes_accuracy = {target} is out of reach: some modes of different classes "
                        "nearly coincide; use another data.seed or a lower bayes_accuracy")
    for _ in range(24):  # to a relative 14 * 2^-24 of the std
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if problem.accuracy(np.exp(mid)) > target else (lo, mid)
    return float(np.exp((lo + hi) / 2))


def build_model(cfg: GaussianImages, seed: int) -> tuple[ImageModel, float]:
    """The generative model of the dataset for `seed`, and the latent noise std it was calibrated to."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0]))
    shape = (cfg.channels, cfg.image_size, cfg.image_size)
    d = cfg.latent_dim
    Q = smooth_fields(rng, shape, d, cfg.smoothness, cfg.margin)
    modes = rng.standard_normal((cfg.n_classes, cfg.modes_per_class, d))
    means = np.concatenate([modes, modes * flip_signs(Q, shape)], axis=1)  # every mode and its mirror image
    # Q is orthonormal, so W^T W = a^2 I and the Bayes rule sees only z + (sigma / a) N(0, I_d): the
    # latent-space noise std is sqrt(s^2 + sigma^2 / a^2), which calibration sets
    noise_std = calibrate(means, cfg.bayes_accuracy, rng)
    # the scale a: the largest RMS deviation of a noise-free pixel from b, sqrt(a^2 q_i^T E[z z^T] q_i),
    # is `contrast`; E[z z^T] = M + s^2 I, M the components' mean of mu mu^T, s^2 = noise^2 - sigma^2/a^2
    mu = means.reshape(-1, d)
    M = mu.T @ mu / len(mu)
    live = (Q**2).sum(1) > 0  # pixels the fields reach (not the margin)
    qMq, qq = np.einsum("pd,de,pe->p", Q[live], M, Q[live]), (Q[live] ** 2).sum(1)
    a2 = float(np.min((cfg.contrast**2 + cfg.pixel_noise**2 * qq) / (qMq + noise_std**2 * qq)))
    s2 = noise_std**2 - cfg.pixel_noise**2 / a2
    if s2 <= 0:
        raise DataError(f"pixel_noise = {cfg.pixel_noise} alone makes the classes harder than "
                        f"bayes_accuracy = {cfg.bayes_accuracy}; lower pixel_noise or raise contrast")
    model = ImageModel(np.sqrt(a2) * Q, means, float(np.sqrt(s2)), cfg.pixel_noise, shape)
    return model, noise_std


def _split(model: ImageModel, n: int, seed: int, index: int,
           measure: bool = False) -> tuple[Split, int, dict[str, np.ndarray]]:
    """n images of one split: the stored (quantised, clipped) inputs, their labels and p*; the number
    of clipped pixel values; with `measure`, per image, the L1 distance of p* to p* at the continuous
    image (`moved`) and to the posterior whose pixel noise variance includes the rounding error's
    (1/255)^2/12 (`rounding`), and whether the argmax moved (`flipped`)."""
    split = Split(np.empty((n, *model.shape), np.float32), np.empty(n, np.int64),
                  np.empty((n, model.num_classes)))
    clipped = 0
    rounded = replace(model, pixel_noise=float(np.sqrt(model.pixel_noise**2 + (1 / 255) ** 2 / 12)))
    effects: dict[str, list[np.ndarray]] = {"moved": [], "rounding": [], "flipped": []}
    for chunk in range(-(-n // CHUNK)):
        rng = np.random.default_rng(np.random.SeedSequence([seed, index, chunk]))
        x, y = model.sample(CHUNK, rng)  # a full chunk, then truncated: smaller splits are prefixes
        part = slice(chunk * CHUNK, min(n, (chunk + 1) * CHUNK))
        x, y = x[:part.stop - part.start], y[:part.stop - part.start]
        clipped += int(((x < 0) | (x > 1)).sum())
        stored = np.clip(np.round(x * 255), 0, 255).astype(np.float32) / 255  # what data.save keeps
        split.x[part], split.y[part] = stored, y
        split.p[part] = p = model.posterior(stored)
        if measure:
            p_cont = model.posterior(x)
            effects["moved"].append(np.abs(p - p_cont).sum(1))
            effects["flipped"].append(p.argmax(1) != p_cont.argmax(1))
            effects["rounding"].append(np.abs(p - rounded.posterior(stored)).sum(1))
    return split, clipped, {k: np.concatenate(v) for k, v in effects.items() if v}


@dataset("gaussian_images", section=GaussianImages, classes=lambda cfg: cfg.n_classes, images=True)
def make_gaussian_images(cfg: GaussianImages, seed: int) -> Dataset:
    """The dataset: train, val (unless n_val is 0) and test splits of one model, with exact p*."""
    model, noise_std = build_model(cfg, seed)
    splits, clipped, effects = {}, 0, {}
    for index, (name, n) in enumerate((("train", cfg.n_train), ("val", cfg.n_val), ("test", cfg.n_test))):
        if n:
            splits[name], c, measured = _split(model, n, seed, index + 1, measure=name == "test")
            clipped += c
            effects |= measured
    values = sum(s.x.size for s in splits.values())
    if clipped > MAX_CLIPPED * values:
        raise DataError(f"gaussian_images: {clipped} of {values} pixel values ({clipped / values:.2e}) "
                        f"fall outside [0, 1] and were clipped, more than {MAX_CLIPPED:.0e}: p* would "
                        "not describe the stored images; lower contrast or pixel_noise")
    test = splits["test"]
    info = {
        "bayes_accuracy": float((test.p.argmax(1) == test.y).mean()),  # argmax p* on the test split
        "normalize": model.normalize(),
        "uint8": True,
        "gaussian_images": {
            "target_bayes_accuracy": cfg.bayes_accuracy,
            "latent_noise_std": noise_std,  # sqrt(s^2 + sigma^2 / a^2): the noise the Bayes rule sees
            "latent_std": model.latent_std,  # s
            "decoder_scale": float(np.linalg.norm(model.decoder[:, 0])),  # a
            "clipped_fraction": clipped / values,
            # on the test split, per image: L1 distance between p* at the stored (rounded) image and
            # p* at the continuous one (mean, max), the share whose argmax differs, and the L1 distance
            # to the posterior with the rounding error's variance added to the pixel noise (the gap to
            # the posterior of the rounded image itself, to first order)
            "quantisation": {
                "mean_l1": float(effects["moved"].mean()), "max_l1": float(effects["moved"].max()),
                "argmax_changed": float(effects["flipped"].mean()),
                "rounding_noise_mean_l1": float(effects["rounding"].mean()),
            },
        },
    }
    return Dataset("gaussian_images", cfg.n_classes, model.shape, splits, (0.0, 1.0), info)
