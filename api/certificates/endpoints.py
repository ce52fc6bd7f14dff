"""/certificate-key: the public key that checks deletion certificates (open: it is public)."""

from __future__ import annotations

from fastapi import APIRouter, Response

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
    summary="The public key of deletion certificates",
)
def certificate_key(signer: SignerDep) -> Response:
    return Response(signer.public_key_pem(), media_type=PEM_MEDIA_TYPE, headers={"X-Key-Id": signer.key_id})
