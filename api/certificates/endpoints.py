"""/certificate-key and /certificate-keys: the public keys that check deletion certificates (open:
they are public)."""

from __future__ import annotations

from fastapi import APIRouter, Response

from api.certificates.schemas import CertificateKey, CertificateKeyList
from api.deps import SignerDep
from api.problems import problem_responses

router = APIRouter(tags=["certificates"])

PEM_MEDIA_TYPE = "application/x-pem-file"


@router.get(
    "/certificate-key",
    response_class=Response,
    responses={
        200: {
            "content": {PEM_MEDIA_TYPE: {"schema": {"type": "string"}}},
            "description": "the Ed25519 public key (PEM, SubjectPublicKeyInfo); its id is in X-Key-Id",
        },
        **problem_responses(500),
    },
    summary="The public key of deletion certificates signed now",
)
def certificate_key(signer: SignerDep) -> Response:
    key = signer.active()  # one read, so the PEM and its id are of the same key even mid-rotation
    return Response(key.public_key_pem, media_type=PEM_MEDIA_TYPE, headers={"X-Key-Id": key.key_id})


@router.get(
    "/certificate-keys",
    response_model=CertificateKeyList,
    responses=problem_responses(500),
    summary="Every public key that checks this service's deletion certificates",
    description=(
        "The active key (it signs the certificates downloaded now) and the retired ones (rotated "
        "out by `uisps certificate rotate-key`; certificates they signed still verify). Pick the "
        "key whose `key_id` the certificate's signature names. A retired key deleted after a leak "
        "is no longer listed."
    ),
)
def certificate_keys(signer: SignerDep) -> CertificateKeyList:
    return CertificateKeyList(
        certificate_keys=[
            CertificateKey(key_id=key.key_id, public_key_pem=key.public_key_pem.decode("ascii"), status=key.status)
            for key in signer.published_keys()
        ]
    )
