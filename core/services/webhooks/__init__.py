"""Webhooks: a signed event POSTed to a deletion request's callback URL when it ends (Standard Webhooks)."""
