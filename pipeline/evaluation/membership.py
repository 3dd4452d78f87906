"""Membership inference audit: how well can an attacker tell a training image from an unseen one?

Every model, private or not, is attacked with two black-box attacks that see only the model's
probabilities and the image's label. Members are a seeded sample of the training split, as
many as there are non-members; non-members are the validation split, drawn from the same
population as the training split and never trained on (only used to pick the epoch, the
temperature and the threshold). Not the test split: MedMNIST's test images come from another
pool than its training and validation images, and an attack would then measure that shift
rather than membership (on PneumoniaMNIST it made a model trained with ε = 1 look leaky:
attack ROC AUC 0.55–0.58). The test split is the attacker's own reference population.

- ``loss``: the classic attack (Yeom et al. 2018): the lower an image's loss −log p(label),
  the more likely it was trained on.
- ``calibrated``: the logit-scaled confidence φ = log p(label) − log(1 − p(label)), standardised
  per class with the mean and standard deviation of φ on the reference split. Losses differ
  between classes far more than between members and non-members of one class (a minority class
  is harder), so one global threshold mixes the two; calibrating by class difficulty (Watson
  et al. 2022) and using φ, which is close to Gaussian (Carlini et al. 2022, LiRA), give the
  attack most of its power where it matters, at low false-positive rates, without training
  shadow models.

For each attack: ROC AUC with a bootstrap 95% CI (0.5 = no leakage), the true-positive rate at
1% and 0.1% false-positive rate (reported only when there are enough non-members to resolve
that rate), and the empirical ε lower bound the attack proves (Jagielski et al. 2020): a
threshold chosen on a seeded half of the images, then on the other half
ε ≥ max(log((TPR − δ)/FPR), log((TNR − δ)/FNR)) with Clopper–Pearson 95% bounds on the rates.
A DP-SGD guarantee of ε must lie above it; an audit with natural images (not worst-case
canaries) is far below a model's true leakage, so it is evidence, not proof, of privacy.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from pipeline.evaluation.metrics import binary_auc, bootstrap_ci

FALSE_POSITIVE_RATES = {"tpr_at_1pct_fpr": 0.01, "tpr_at_0.1pct_fpr": 0.001}
CONFIDENCE = 0.95


def true_class_log_odds(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per image: the loss −log p(label) and the logit-scaled confidence log p − log(1 − p)."""
    p = np.clip(probs[np.arange(len(labels)), labels].astype(np.float64), 1e-12, 1.0)
    rest = np.clip(1.0 - p, 1e-12, 1.0)
    return -np.log(p), np.log(p) - np.log(rest)


def attack_scores(probs: np.ndarray, labels: np.ndarray, reference: tuple[np.ndarray, np.ndarray]
                  ) -> dict[str, np.ndarray]:
    """Membership scores (higher = more likely a member) of both attacks."""
    loss, phi = true_class_log_odds(probs, labels)
    _, ref_phi = true_class_log_odds(*reference)
    ref_labels = reference[1]
    overall = (float(ref_phi.mean()), float(ref_phi.std()) or 1.0)
    calibrated = np.empty_like(phi)
    for c in np.unique(labels):
        of_class = ref_phi[ref_labels == c]
        mean, std = (float(of_class.mean()), float(of_class.std()) or 1.0) if len(of_class) > 1 else overall
        calibrated[labels == c] = (phi[labels == c] - mean) / std
    return {"loss": -loss, "calibrated": calibrated}


def tpr_at_fpr(member: np.ndarray, score: np.ndarray, fpr: float) -> float | None:
    """Share of members scored above the highest threshold that lets at most ``fpr`` of the
    non-members through; None when there are fewer than 1/fpr non-members."""
    outside = np.sort(score[~member])[::-1]
    if len(outside) < 1 / fpr:
        return None
    threshold = outside[math.floor(fpr * len(outside))]
    return float((score[member] > threshold).mean())


def clopper_pearson(successes: int, trials: int, level: float) -> tuple[float, float]:
    """Exact two-sided binomial confidence interval."""
    from scipy.stats import beta

    alpha = 1 - level
    low = 0.0 if successes == 0 else float(beta.ppf(alpha / 2, successes, trials - successes + 1))
    high = 1.0 if successes == trials else float(beta.ppf(1 - alpha / 2, successes + 1, trials - successes))
    return low, high


def epsilon_bound(tp: int, members: int, fp: int, non_members: int, delta: float) -> float:
    """The ε a (TPR, FPR) pair proves with ``CONFIDENCE``, from both tails of the test (0 when none)."""
    # Each rate gets half the error budget, so both bounds hold together at CONFIDENCE.
    level = 1 - (1 - CONFIDENCE) / 2
    tpr_low, _ = clopper_pearson(tp, members, level)
    _, fpr_high = clopper_pearson(fp, non_members, level)
    bounds = [0.0]
    if tpr_low - delta > 0 and fpr_high > 0:
        bounds.append(math.log((tpr_low - delta) / fpr_high))
    if 1 - fpr_high - delta > 0 and 1 - tpr_low > 0:
        bounds.append(math.log((1 - fpr_high - delta) / (1 - tpr_low)))
    return max(bounds)


def empirical_epsilon(member: np.ndarray, score: np.ndarray, delta: float, seed: int) -> float:
    """ε lower bound: threshold chosen on a seeded half, rates measured on the other half."""
    rng = np.random.default_rng([seed, 29])
    pick = rng.permutation(len(member)) < len(member) // 2
    best, best_value = None, -math.inf
    fit_member, fit_score = member[pick], score[pick]
    for threshold in np.unique(np.quantile(fit_score, np.linspace(0, 1, 201))):
        above = fit_score >= threshold
        value = epsilon_bound(int((above & fit_member).sum()), int(fit_member.sum()), int((above & ~fit_member).sum()),
                              int((~fit_member).sum()), delta)
        if value > best_value:
            best, best_value = threshold, value
    held_member, held_score = member[~pick], score[~pick]
    above = held_score >= best
    return epsilon_bound(int((above & held_member).sum()), int(held_member.sum()), int((above & ~held_member).sum()),
                         int((~held_member).sum()), delta)


def audit(members: tuple[np.ndarray, np.ndarray], non_members: tuple[np.ndarray, np.ndarray],
          reference: tuple[np.ndarray, np.ndarray], delta: float, bootstrap: int, seed: int) -> dict[str, Any]:
    """Both attacks on (probabilities, labels) of members and non-members; see the module docstring."""
    probs = np.concatenate([members[0], non_members[0]])
    labels = np.concatenate([members[1], non_members[1]])
    member = np.r_[np.ones(len(members[1]), bool), np.zeros(len(non_members[1]), bool)]
    result: dict[str, Any] = {"members": int(member.sum()), "non_members": int((~member).sum()),
                              "reference": len(reference[1]), "delta": delta, "attacks": {}}
    for name, score in attack_scores(probs, labels, reference).items():
        ci = bootstrap_ci(member, score, lambda m, s: {"roc_auc": binary_auc(m, s)}, bootstrap, seed)["roc_auc"]
        result["attacks"][name] = {
            "roc_auc": round(binary_auc(member, score), 6), "roc_auc_ci_low": ci[0], "roc_auc_ci_high": ci[1],
            **{key: tpr_at_fpr(member, score, fpr) for key, fpr in FALSE_POSITIVE_RATES.items()},
            "empirical_epsilon": round(empirical_epsilon(member, score, delta, seed), 6),
        }
    return result
