"""The `agent-state` command: the local stack, the API on loopback, and a client of the API.

A developer's and operator's tool, kept out of the Functions package: it drives
the local stack (`devstack`) and fetches access tokens, which the deployed app
never does.
"""
