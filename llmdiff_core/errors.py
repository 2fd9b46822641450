"""Errors that reach users: each message names the problem and what to do about it."""


class LLMDiffError(ValueError):
    """A user-facing problem (bad file, mismatched models, bad prompt). Never an internal bug."""


class AdapterMismatchError(LLMDiffError):
    """An adapter does not fit the MODEL or the LLM it is used with."""
