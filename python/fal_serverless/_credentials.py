"""Credentials for the `cloud` host."""

from __future__ import annotations

from dataclasses import dataclass, field


class Credentials:
    """Base of every kind of credentials."""


@dataclass(frozen=True)
class CloudKeyCredentials(Credentials):
    """A key made by `fal-serverless keys create`: its id and its secret."""

    key_id: str
    key_secret: str = field(repr=False)

    def __post_init__(self) -> None:
        for name in ("key_id", "key_secret"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"CloudKeyCredentials needs a non-empty string {name}, got {value!r}")


# The name the original fal-serverless client exports.
FalServerlessKeyCredentials = CloudKeyCredentials
