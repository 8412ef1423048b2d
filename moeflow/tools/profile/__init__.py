"""Expert-cache profiling (`moeflow profile`). Transitional: the module moved here whole and is split next."""

from moeflow.tools.profile.replay import (
    BudgetPoint,
    Geometry,
    activation_counts,
    coactivation,
    default_label,
    live_run,
    parse_budgets,
    parse_policies,
    profile_model,
    read_report,
    replay,
    reuse_distances,
    run_profile,
)

__all__ = [
    "BudgetPoint",
    "Geometry",
    "activation_counts",
    "coactivation",
    "default_label",
    "live_run",
    "parse_budgets",
    "parse_policies",
    "profile_model",
    "read_report",
    "replay",
    "reuse_distances",
    "run_profile",
]
