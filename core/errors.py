"""Errors a user can act on. Anything raised as `UisError` is shown as one clear line."""


class UisError(Exception):
    """Base for errors caused by input: the CLI prints them, the API maps them to 4xx."""

    code = "invalid_input"


class InvalidLabels(UisError):
    code = "invalid_labels"


class DataError(UisError):
    code = "invalid_data"


class CheckpointError(UisError):
    code = "invalid_checkpoint"


class ArchitectureError(UisError):
    code = "invalid_architecture"


class DeviceUnavailable(UisError):
    code = "device_unavailable"


class UnlearningDiverged(UisError):
    code = "unlearning_diverged"
