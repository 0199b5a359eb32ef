"""Prefect flows of bayeskd; the logic is in `bayeskd.flows`. Deployments: prefect.yaml."""
