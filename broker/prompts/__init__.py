"""The prompt lifecycle: every write a prompt causes, each written once, for a batch.

admit (rate limits, active-prompt slots, budget reservations, the `pending` record) →
ComfyUI's answer (`queued`) → `running` → finished (settle: the actual charge, the
reservations and the slot released, the spend counted). Also: a forward that failed,
a prompt ComfyUI has no trace of (lost), outputs, cached nodes, reported prices.

Each step is a `Kind` of the group committer (`broker/db/group_commit.py`): it gets all
of a batch's items at once and writes them with a few Core statements; a single prompt
is a batch of one. This package is the one place to change a prompt rule: the HTTP
surfaces (`broker/proxy/`) and the ComfyUI event hub only call `broker.prompts.lifecycle`.
Here too: what ComfyUI's events and history say of how a prompt ended (`outcomes.py`),
and settling from `/history` what a server's socket missed (`reconciliation.py`).
"""
