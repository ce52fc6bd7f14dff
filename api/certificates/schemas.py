"""Response bodies of /certificate-keys."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class CertificateKey(BaseModel):
    key_id: str = Field(
        description="sha256 of the raw public key, as 'sha256:<hex>': the key_id a certificate's signature names",
        examples=["sha256:" + "0" * 64],
    )
    public_key_pem: str = Field(description="the Ed25519 public key, PEM (SubjectPublicKeyInfo)")
    status: Literal["active", "retired"] = Field(
        description="active: signs the certificates downloaded now; retired: signed earlier ones, which it still checks"
    )


class CertificateKeyList(BaseModel):
    certificate_keys: list[CertificateKey] = Field(description="the active key first, then the retired ones")
