"""Mixture weights: per-source weights, temperature sampling, and the repetition they imply.

With temperature T, source i is sampled with probability p_i ∝ w_i · n_i^(1/T), where
n_i is its training tokens and w_i its configured weight: T = 1 is the natural mix
(scaled by the weights), T → ∞ flattens towards the weights alone (uniform when all are
equal), T < 1 sharpens towards the largest source. Small sources sampled up are repeated:
past about four epochs extra repeats are worth much less than fresh data (Muennighoff et
al. 2023, "Scaling Data-Constrained Language Models"), so planning warns beyond that.
"""

from __future__ import annotations

from lmforge.core.logging import get_logger

log = get_logger(__name__)
EPOCH_WARNING = 4.0


def mixture_probabilities(tokens: dict[str, int], weights: dict[str, float] | None = None,
                          temperature: float | None = None) -> dict[str, float]:
    """Sampling probability per source (sources with weight 0 or no tokens are left out).

    ``temperature=None`` takes the weights as the mix itself (the loader's historical
    behaviour; with no weights, the natural mix by tokens).
    """
    if temperature is not None and temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if weights is None:
        weights = {name: 1.0 for name in tokens}
        if temperature is None:
            temperature = 1.0
    unknown = sorted(set(weights) - set(tokens))
    if unknown:
        raise ValueError(f"weights name unknown sources {unknown} (sources: {', '.join(sorted(tokens))})")
    if any(w < 0 for w in weights.values()):
        raise ValueError(f"weights must be >= 0, got {weights}")
    raw = {}
    for name, weight in weights.items():
        if weight <= 0 or tokens[name] <= 0:
            continue
        raw[name] = weight if temperature is None else weight * tokens[name] ** (1.0 / temperature)
    total = sum(raw.values())
    if total <= 0:
        raise ValueError(f"the mixture selects no source with tokens: weights {weights}, tokens {tokens}")
    return {name: value / total for name, value in sorted(raw.items())}


def planned_epochs(tokens: dict[str, int], probabilities: dict[str, float], total_tokens: int) -> dict[str, float]:
    """Epochs of each source that drawing ``total_tokens`` tokens with ``probabilities`` consumes."""
    return {name: p * total_tokens / tokens[name] for name, p in probabilities.items() if tokens.get(name)}


def warn_repeats(epochs: dict[str, float], limit: float = EPOCH_WARNING) -> list[str]:
    """Log (and return) the sources planned past ``limit`` epochs."""
    over = sorted(name for name, e in epochs.items() if e > limit)
    for name in over:
        log.warning("source %r will be repeated %.1f times: beyond ~%g epochs extra repeats add little "
                    "(Muennighoff et al. 2023); lower its weight or the mixture temperature, or add data", name, epochs[name], limit)
    return over


def manifest_mixture(tokens: dict[str, int], weights: dict[str, float], temperature: float | None) -> dict:
    """The mixture a config implies, as recorded in the manifest."""
    probabilities = mixture_probabilities(tokens, weights, temperature)
    # Tokens that can be drawn before the first source passes EPOCH_WARNING epochs.
    budget = min(EPOCH_WARNING * tokens[name] / p for name, p in probabilities.items())
    return {"temperature": temperature, "weights": dict(sorted(weights.items())),
            "train_tokens": dict(sorted(tokens.items())), "probabilities": probabilities,
            "tokens_before_any_source_passes_4_epochs": int(budget)}
