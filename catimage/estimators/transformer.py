"""The paper's estimator: a small Transformer over frozen per-token prompt embeddings.

Architecture (`build_module`): per-token embeddings (n, T, d) -> linear projection to `width` ->
`layers` x nn.TransformerEncoderLayer (`heads` heads, dropout, key padding mask from the all-zero
padding rows) -> a two-layer MLP with M sigmoid outputs applied to EVERY token -> the per-token
probabilities averaged over the prompt's real tokens -> (n, M) expected scaled quality. No positional
encoding is added: the frozen encoder's token features already carry position.

Loss (`masked_bce_loss`): for each prompt, the sum over candidates of the binary cross-entropy between
the predicted probability and the [0, 1]-scaled label (a soft target), with missing labels masked out
and, when counts are given, each label weighted by its sample count divided by the training split's
mean count; averaged over prompts. AdamW, mini-batches, early stopping on the validation loss with
`patience`, and the best epoch's weights restored.

The epoch-level pieces (`build_module`, `make_loader`, `train_epoch`, `evaluate_loss`,
`TransformerEstimator.from_module`) are public so that a Ray Train worker can drive the same loop and
still produce an estimator that saves in the common format. Nothing here touches global torch
settings for good (threads, seeds): fitting runs inside `torch.random.fork_rng` and with `n_threads`
intra-op threads (1 by default), the previous count restored afterwards.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from catimage.estimators.base import EstimatorError, QualityEstimator, label_weights
from catimage.features.tokens import TokenBatch

log = logging.getLogger(__name__)

ARCH_PARAMS = ("width", "layers", "heads", "dropout", "ff_mult")
_EPS = 1e-6


def token_mask(x: torch.Tensor) -> torch.Tensor:
    """(B, T) True for real tokens. A prompt with no non-zero row keeps position 0 so it still gets
    a prediction (e.g. a TF-IDF vector of only unknown words)."""
    valid = (x != 0).any(dim=-1)
    empty = ~valid.any(dim=1)
    if empty.any():
        valid = valid.clone()
        valid[empty, 0] = True
    return valid


class TokenQualityNet(nn.Module):
    """Per-token sigmoid heads over a small Transformer encoder, averaged over real tokens."""

    def __init__(
        self, d_in: int, n_outputs: int, width: int = 64, layers: int = 2, heads: int = 4,
        dropout: float = 0.1, ff_mult: int = 4,
    ) -> None:
        super().__init__()
        self.d_in = int(d_in)
        self.n_outputs = int(n_outputs)
        self.input_proj = nn.Linear(d_in, width)
        layer = nn.TransformerEncoderLayer(
            d_model=width, nhead=heads, dim_feedforward=ff_mult * width, dropout=dropout, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)
        self.head = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Dropout(dropout), nn.Linear(width, n_outputs))

    def token_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """((B, T, M) per-token logits, (B, T) real-token mask)."""
        valid = token_mask(x)
        h = self.encoder(self.input_proj(x), src_key_padding_mask=~valid)
        return self.head(h), valid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, M) probabilities: the mean over real tokens of the per-token sigmoid outputs."""
        logits, valid = self.token_logits(x)
        probs = torch.sigmoid(logits) * valid.unsqueeze(-1)
        return probs.sum(dim=1) / valid.sum(dim=1, keepdim=True)


def build_module(
    d_in: int, n_outputs: int, width: int = 64, layers: int = 2, heads: int = 4, dropout: float = 0.1, ff_mult: int = 4
) -> TokenQualityNet:
    """The network for `d_in`-wide token features and `n_outputs` candidates (random init)."""
    if width % heads:
        raise EstimatorError(f"transformer width ({width}) must be divisible by heads ({heads})")
    if min(d_in, n_outputs, width, layers, heads, ff_mult) < 1 or not 0 <= dropout < 1:
        raise EstimatorError("transformer sizes must be positive and dropout in [0, 1)")
    return TokenQualityNet(d_in, n_outputs, width=width, layers=layers, heads=heads, dropout=dropout, ff_mult=ff_mult)


def arch_params(params: dict[str, Any]) -> dict[str, Any]:
    """The subset of estimator params that `build_module` takes."""
    return {k: params[k] for k in ARCH_PARAMS if k in params}


def masked_bce_loss(probs: torch.Tensor, Y: torch.Tensor, mask_weights: torch.Tensor) -> torch.Tensor:
    """Sum over candidates of soft-target BCE, weighted (0 = missing label), mean over prompts.

    `Y` must hold finite values everywhere (put anything where the weight is 0).
    """
    probs = probs.clamp(_EPS, 1 - _EPS)
    bce = F.binary_cross_entropy(probs, Y, reduction="none")
    return (bce * mask_weights).sum() / max(probs.shape[0], 1)


def loss_weights(Y: np.ndarray, counts: np.ndarray | None, count_scale: float | None = None) -> np.ndarray:
    """(n, M) loss weights: 0 for missing labels, else count / count_scale (1 without counts).

    `count_scale` defaults to the mean count over labelled entries, so weights average to 1 and the
    learning rate means the same with or without counts. Pass the training split's scale when
    weighting validation data.
    """
    w = label_weights(Y, counts)
    if counts is not None:
        scale = count_scale if count_scale is not None else float(w[w > 0].mean()) if (w > 0).any() else 1.0
        w = w / scale
    return w


def as_token_batch(X: np.ndarray | TokenBatch) -> TokenBatch:
    """Ragged float16 tokens (a TokenBatch passes through; a padded array is packed once)."""
    return X if isinstance(X, TokenBatch) else TokenBatch.from_padded(X)


def length_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator | None) -> list[np.ndarray]:
    """Batches of row positions with similar lengths (little padding), in random order when `rng`.

    Rows are sorted by length plus a random jitter of up to two tokens, cut into batches, and the
    batches shuffled: every epoch sees different batches, yet a batch of short prompts is not padded
    to the longest prompt of the table.
    """
    key = lengths + (rng.uniform(0, 2, lengths.size) if rng is not None else 0.0)
    order = np.argsort(key, kind="stable")
    batches = [order[i : i + batch_size] for i in range(0, order.size, batch_size)]
    if rng is not None:
        rng.shuffle(batches)
    return batches


class TokenLoader:
    """Re-iterable (x, y, w) float32 tensor batches over ragged tokens; reshuffled every pass."""

    def __init__(self, X: np.ndarray | TokenBatch, Y: np.ndarray, weights: np.ndarray, batch_size: int = 32,
                 shuffle: bool = True, seed: int = 0) -> None:
        self.X = as_token_batch(X)
        self.Y = torch.from_numpy(np.nan_to_num(Y).astype(np.float32))
        self.w = torch.from_numpy(np.asarray(weights, dtype=np.float32))
        self.batch_size = int(batch_size)
        self.rng = np.random.default_rng(seed) if shuffle else None

    def __len__(self) -> int:
        return (len(self.X) + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        for idx in length_batches(self.X.lengths, self.batch_size, self.rng):
            yield torch.from_numpy(self.X.padded(idx)), self.Y[idx], self.w[idx]


def make_loader(
    X: np.ndarray | TokenBatch, Y: np.ndarray, weights: np.ndarray, batch_size: int = 32, shuffle: bool = True,
    seed: int = 0,
) -> TokenLoader:
    """Batches of (x, y, w) float32 tensors; NaN labels become 0 (their weight is 0)."""
    return TokenLoader(X, Y, weights, batch_size, shuffle, seed)


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def train_epoch(module: nn.Module, loader: Any, optimizer: torch.optim.Optimizer) -> float:
    """One pass over `loader`; returns the mean per-prompt training loss."""
    module.train()
    device = _device_of(module)
    total, n = 0.0, 0
    for x, y, w in loader:
        x, y, w = x.to(device), y.to(device), w.to(device)
        optimizer.zero_grad(set_to_none=True)
        loss = masked_bce_loss(module(x), y, w)
        loss.backward()
        optimizer.step()
        total += float(loss.detach()) * x.shape[0]
        n += x.shape[0]
    return total / max(n, 1)


def predict_module(module: nn.Module, X: np.ndarray | TokenBatch, batch_size: int = 256) -> np.ndarray:
    """(n, M) float64 probabilities, in eval mode and without gradients (length-bucketed batches)."""
    module.eval()
    device = _device_of(module)
    tokens = as_token_batch(X)
    out = np.empty((len(tokens), module.n_outputs))
    with torch.no_grad():
        for idx in length_batches(tokens.lengths, batch_size, None):
            x = torch.from_numpy(tokens.padded(idx)).to(device)
            out[idx] = module(x).double().cpu().numpy()
    return out


def evaluate_loss(
    module: nn.Module,
    X: np.ndarray,
    Y: np.ndarray,
    counts: np.ndarray | None = None,
    count_scale: float | None = None,
    batch_size: int = 256,
) -> float:
    """Mean per-prompt masked BCE of `module` on (X, Y); count-weighted like training when given."""
    w = loss_weights(Y, counts, count_scale)
    probs = torch.from_numpy(predict_module(module, X, batch_size))
    y = torch.from_numpy(np.nan_to_num(Y))
    return float(masked_bce_loss(probs, y, torch.from_numpy(w)))


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run with `n` torch intra-op threads, then restore the previous setting (None: leave it).

    This network is small (tens of thousands of weights, batches of ~20-token prompts): its ops are
    too short to split across threads, and on a 2-core machine two threads spent several times the
    CPU of one (and far more wall time whenever another process ran). One thread is the default.
    """
    if not n:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class Schedule:
    """How long a fit trains: batch size, epoch cap, and epochs without improvement before stopping."""

    batch_size: int
    max_epochs: int
    patience: int


def mean_count(Y: np.ndarray, counts: np.ndarray) -> float:
    """The mean sample count over labelled cells: the scale that makes loss weights average 1."""
    w = label_weights(Y, counts)
    return float(w[w > 0].mean()) if (w > 0).any() else 1.0


def early_stopping_split(n: int, fraction: float, random_state: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, early-stopping rows) of n training prompts: `fraction` of them, none below 20
    prompts. The in-process fit and the Ray Train job both use it, so they hold out the same prompts."""
    if fraction <= 0 or n < 20:
        return np.arange(n), np.zeros(0, dtype=np.int64)
    perm = np.random.default_rng(random_state).permutation(n)
    n_early_stopping = max(1, round(fraction * n))
    return perm[n_early_stopping:], perm[:n_early_stopping]


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class TransformerEstimator(QualityEstimator):
    """Token-level Transformer estimator (see the module docstring).

    Without validation data, `validation_fraction` of the training prompts is held out for early
    stopping (none below 20 prompts: then it trains `max_epochs`).
    """

    kind = "transformer"
    input_kind = "tokens"

    def __init__(
        self,
        width: int = 64,
        layers: int = 2,
        heads: int = 4,
        dropout: float = 0.1,
        ff_mult: int = 4,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        batch_size: int | str = "auto",
        max_epochs: int | str = "auto",
        patience: int | str = "auto",
        validation_fraction: float = 0.1,
        use_counts: bool = True,
        random_state: int = 0,
        device: str = "cpu",
        n_threads: int | None = 1,
    ) -> None:
        self.width = width
        self.layers = layers
        self.heads = heads
        self.dropout = dropout
        self.ff_mult = ff_mult
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.patience = patience
        self.validation_fraction = validation_fraction
        self.use_counts = use_counts
        self.random_state = random_state
        self.device = device
        self.n_threads = n_threads

    def _fit(self, X, Y, counts, X_val, Y_val, counts_val) -> None:
        with torch_threads(self.n_threads):
            self._fit_module(X, Y, counts, X_val, Y_val, counts_val)

    def _fit_module(self, X, Y, counts, X_val, Y_val, counts_val) -> None:
        X = as_token_batch(X)
        X_val = as_token_batch(X_val) if X_val is not None else None
        plan = self.schedule(len(X))
        self.batch_size_, self.max_epochs_, self.patience_ = plan.batch_size, plan.max_epochs, plan.patience
        if not self.use_counts:
            counts = counts_val = None
        if X_val is None:
            tr, val = early_stopping_split(len(X), self.validation_fraction, self.random_state)
            if val.size:
                X_val, Y_val = X[val], Y[val]
                counts_val = counts[val] if counts is not None else None
                X, Y = X[tr], Y[tr]
                counts = counts[tr] if counts is not None else None
        self.count_scale_ = 1.0 if counts is None else mean_count(Y, counts)
        device = _resolve_device(self.device)
        fork_devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=fork_devices):
            torch.manual_seed(self.random_state)
            module = build_module(X.shape[-1], Y.shape[1], **arch_params(self.get_params())).to(device)
            loader = make_loader(X, Y, loss_weights(Y, counts, self.count_scale_), plan.batch_size, seed=self.random_state)
            stop_loss = None if X_val is None else lambda: evaluate_loss(module, X_val, Y_val, counts_val, self.count_scale_)
            self._train(module, loader, stop_loss, plan)
        self.module_ = module.eval()

    def _train(self, module: nn.Module, loader: TokenLoader, stop_loss: Any, plan: Schedule) -> None:
        """AdamW epochs; with `stop_loss` (the early-stopping loss), stop after `plan.patience` epochs
        without a new best and restore the best epoch's weights."""
        optimizer = torch.optim.AdamW(module.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        self.train_loss_: list[float] = []
        self.val_loss_: list[float] = []
        best_loss, best_state, self.best_epoch_, waited = np.inf, None, -1, 0
        for epoch in range(plan.max_epochs):
            self.train_loss_.append(train_epoch(module, loader, optimizer))
            log.info("transformer epoch %d/%d: train loss %.4f", epoch + 1, plan.max_epochs, self.train_loss_[-1])
            if stop_loss is None:
                continue
            self.val_loss_.append(stop_loss())
            if self.val_loss_[-1] < best_loss - 1e-7:
                best_loss, best_state = self.val_loss_[-1], copy.deepcopy(module.state_dict())
                self.best_epoch_, waited = epoch, 0
            else:
                waited += 1
                if waited >= plan.patience:
                    break
        if best_state is not None:
            module.load_state_dict(best_state)
        else:
            self.best_epoch_ = len(self.train_loss_) - 1
        log.info("transformer: %d epochs, best epoch %d (early-stopping loss %s)", len(self.train_loss_),
                 self.best_epoch_, f"{best_loss:.4f}" if np.isfinite(best_loss) else "n/a")

    def schedule(self, n: int) -> Schedule:
        """The batch size, epoch cap and patience for `n` training prompts ("auto" resolved).

        "auto" scales with the table so that a fit costs about the same number of optimizer steps on
        500 and on 10,000 prompts: batches of 32 up to 128 prompts, at most 200 epochs, fewer (down
        to 15) when epochs are long; patience a sixth of the epoch cap (3 to 20 epochs), since the
        early-stopping loss of a large table is smooth and its best epoch comes early (measured on
        benchmarks/evaluate_scale.py's 10,000-prompt table: best epoch 5 of 20, never improved after).
        """
        batch = self.batch_size
        if batch == "auto":
            batch = int(np.clip(2 ** np.round(np.log2(max(n, 1) / 64)), 32, 128))
        epochs = self.max_epochs
        if epochs == "auto":
            epochs = int(np.clip(40_000 * batch // max(n * 32, 1), 15, 200))
        patience = self.patience
        if patience == "auto" and isinstance(epochs, int | np.integer):
            patience = int(np.clip(epochs // 6, 3, 20))
        for name, value, given in (("batch_size", batch, self.batch_size), ("max_epochs", epochs, self.max_epochs),
                                   ("patience", patience, self.patience)):
            if not isinstance(value, int | np.integer) or value < 1:
                raise EstimatorError(f"transformer {name} must be a positive integer or 'auto'; got {given!r}")
        return Schedule(int(batch), int(epochs), int(patience))

    def _predict(self, X: np.ndarray) -> np.ndarray:
        with torch_threads(getattr(self, "n_threads", None)):
            return predict_module(self.module_, X)

    @classmethod
    def from_module(
        cls, module: TokenQualityNet, params: dict[str, Any] | None = None, count_scale: float = 1.0
    ) -> TransformerEstimator:
        """Wrap a trained module (e.g. from a Ray Train worker) as a fitted estimator.

        `params` are the estimator params it was trained with; their architecture entries must
        match the module.
        """
        est = cls(**(params or {}))
        probe = build_module(module.d_in, module.n_outputs, **arch_params(est.get_params()))
        theirs = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        ours = {k: tuple(v.shape) for k, v in probe.state_dict().items()}
        if theirs != ours:
            raise EstimatorError("the module's architecture does not match params (width / layers / heads / ff_mult)")
        est.module_ = module.eval()
        est.n_features_in_ = int(module.d_in)
        est.n_candidates_ = int(module.n_outputs)
        est.count_scale_ = float(count_scale)
        est.train_loss_, est.val_loss_, est.best_epoch_ = [], [], -1
        est.is_fitted_ = True
        return est

    def _state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        tensors = {f"module.{k}": v.detach().cpu().numpy() for k, v in self.module_.state_dict().items()}
        meta = {
            "count_scale": self.count_scale_,
            "best_epoch": int(self.best_epoch_),
            "train_loss": [float(v) for v in self.train_loss_],
            "val_loss": [float(v) for v in self.val_loss_],
        }
        return meta, tensors

    def _restore(self, meta: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
        module = build_module(self.n_features_in_, self.n_candidates_, **arch_params(self.get_params()))
        state = {k[len("module.") :]: torch.from_numpy(v.copy()) for k, v in tensors.items() if k.startswith("module.")}
        module.load_state_dict(state)
        self.module_ = module.to(_resolve_device(self.device)).eval()
        self.count_scale_ = float(meta.get("count_scale", 1.0))
        self.best_epoch_ = int(meta.get("best_epoch", -1))
        self.train_loss_ = list(meta.get("train_loss", []))
        self.val_loss_ = list(meta.get("val_loss", []))
