"""Errors a user can act on. Each message names the problem and what to do about it."""

from __future__ import annotations


class MoeflowError(ValueError):
    """Base class of every error caused by user input (a path, a budget, a request)."""


class CheckpointError(MoeflowError):
    """The model folder is missing, incomplete or corrupt."""


class UnsupportedArchitectureError(MoeflowError):
    """The checkpoint's architecture is not one moeflow can offload."""


class BudgetError(MoeflowError):
    """The expert budget cannot run this model (too small, or malformed)."""


class RequestError(MoeflowError):
    """A generation request is invalid: prompt, length or sampling parameters."""
