from __future__ import annotations

import re

from pydantic import Field, SecretStr, field_validator

from broker.tenants.schemas import RequestModel

COMFY_KEY_PATTERN = re.compile(r"^[A-Za-z0-9._~+/=-]{16,512}$")


class ComfyKeySet(RequestModel):
    api_key: SecretStr = Field(
        description="The user's Comfy.org API key (comfyui-…). Write-only: never returned."
    )

    @field_validator("api_key")
    @classmethod
    def _well_formed(cls, value: SecretStr) -> SecretStr:
        # The message names the rule, never the value.
        if not COMFY_KEY_PATTERN.fullmatch(value.get_secret_value()):
            raise ValueError("must be 16-512 characters of letters, digits and ._~+/=- (no spaces)")
        return value
