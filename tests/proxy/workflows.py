"""Workflows in ComfyUI's API format, as clients send them."""

from __future__ import annotations

import copy
from typing import Any

# The Comfy docs' example (FluxProUltraImageNode → SaveImage, LoadImage example.png).
DOCS_WORKFLOW: dict[str, Any] = {
    "11": {
        "inputs": {
            "prompt": "A dreamy, surreal half-body portrait of a young woman meditating.",
            "prompt_upsampling": False,
            "seed": 589991183902375,
            "aspect_ratio": "1:1",
            "raw": False,
            "image_prompt_strength": 0.4000000000000001,
            "image_prompt": ["14", 0],
        },
        "class_type": "FluxProUltraImageNode",
        "_meta": {"title": "Flux 1.1 [pro] Ultra Image"},
    },
    "12": {
        "inputs": {"filename_prefix": "ComfyUI", "images": ["11", 0]},
        "class_type": "SaveImage",
        "_meta": {"title": "Save Image"},
    },
    "14": {
        "inputs": {"image": "example.png"},
        "class_type": "LoadImage",
        "_meta": {"title": "Load Image"},
    },
}

# A local-only workflow: no API node, no key needed.
LOCAL_WORKFLOW: dict[str, Any] = {
    "1": {"inputs": {"image": "example.png"}, "class_type": "LoadImage"},
    "2": {"inputs": {"filename_prefix": "local", "images": ["1", 0]}, "class_type": "SaveImage"},
}


def docs_workflow(seed: int | None = None) -> dict[str, Any]:
    workflow = copy.deepcopy(DOCS_WORKFLOW)
    if seed is not None:
        workflow["11"]["inputs"]["seed"] = seed
    return workflow
