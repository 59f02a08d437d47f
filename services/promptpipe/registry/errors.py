"""What can go wrong with the registry, each with a message that says what to do."""

from __future__ import annotations


class RegistryError(Exception):
    """Any registry failure; the message is meant for the user."""


class NotInitialized(RegistryError):
    """The bucket or the table does not exist."""


class AuthError(RegistryError):
    """Credentials missing, refused, or not allowed."""


class NotFound(RegistryError):
    """No such model, version or alias."""


class VersionExists(RegistryError):
    """A published version is immutable."""


class IntegrityError(RegistryError):
    """An artifact does not match its recorded hash (or is missing)."""


class Unreachable(RegistryError):
    """The endpoint could not be reached."""


# The exit status of `promptpipe model pull` when the registry could not be reached (sysexits' EX_TEMPFAIL):
# a pod's model download that ends so is tried again (the kubelet's back-off), not taken for a bad model.
UNREACHABLE_EXIT = 75


class Conflict(RegistryError):
    """The change was made against a state that has moved since (an alias promoted meanwhile)."""
