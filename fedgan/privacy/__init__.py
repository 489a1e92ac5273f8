"""Differential privacy: Opacus DP-SGD on the discriminator, one persistent accountant per
hospital, budgets that are never overspent, and Flower's central DP as an option."""

from fedgan.privacy.accounting import (
    BudgetExhausted,
    HospitalAccountant,
    PrivacyPlan,
    default_delta,
    plan_privacy,
)
from fedgan.privacy.engine import check_privatizable, make_private_discriminator

__all__ = [
    "BudgetExhausted",
    "HospitalAccountant",
    "PrivacyPlan",
    "check_privatizable",
    "default_delta",
    "make_private_discriminator",
    "plan_privacy",
]
