"""Rows the service tests write straight into the database, as the service itself would."""

from __future__ import annotations

import uuid

from sqlalchemy.orm import Session

from core.db import Model


def add_digits_model(session: Session, tenant_id: str = "default") -> Model:
    """A smallcnn model on the digits, uniquely named, flushed (its id is set)."""
    model = Model(tenant_id=tenant_id, name=f"m-{uuid.uuid4().hex[:8]}", architecture="smallcnn", arch_kwargs={},
                  num_classes=10, class_names=[str(i) for i in range(10)], input_shape=[1, 8, 8], mean=[0.3],
                  std=[0.4], data_source="digits")
    session.add(model)
    session.flush()
    return model
