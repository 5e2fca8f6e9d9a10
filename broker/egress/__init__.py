"""Sealed key mode: the broker as ComfyUI's Comfy API endpoint (`/comfy-api/…`).

ComfyUI holds a per-prompt capability instead of the user's key; the egress swaps it
for the key, checks the budgets, calls the Comfy API and records each call's charge.
"""
