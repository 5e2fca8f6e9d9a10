"""The request bodies the benchmarks send: what ComfyUI clients send to `POST /prompt`."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

import orjson

LARGE_TARGET_BYTES = 100 * 1024

# The Comfy docs' example: FluxProUltraImageNode (an API node, so the broker unseals and
# injects the user's key) → SaveImage, with LoadImage example.png.
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


@dataclass(frozen=True)
class Body:
    name: str
    description: str
    content: bytes

    @property
    def size_label(self) -> str:
        return f"{len(self.content) / 1024:.1f} KiB"


def docs_body() -> Body:
    # Encoded as the docs' own script does: `json.dumps({"prompt": prompt, "client_id": ...})`.
    payload = {"prompt": DOCS_WORKFLOW, "client_id": "bench-client"}
    content = json.dumps(payload).encode()
    return Body("docs", "the Comfy docs' 3-node workflow (API node included)", content)


def large_body(target_bytes: int = LARGE_TARGET_BYTES) -> Body:
    """The docs workflow plus a chain of local sampler nodes, up to ~`target_bytes`."""
    graph = copy.deepcopy(DOCS_WORKFLOW)
    index = 100
    while len(orjson.dumps({"prompt": graph})) < target_bytes:
        graph.update(_sampler_chain(index))
        index += 4
    payload = {"prompt": graph, "client_id": "bench-client"}
    nodes = len(graph)
    return Body("large", f"{nodes} nodes (the docs workflow plus samplers)", orjson.dumps(payload))


def _sampler_chain(first: int) -> dict[str, Any]:
    checkpoint, positive, negative, sampler = (str(first + i) for i in range(4))
    text = "a lighthouse on a cliff at dusk, volumetric light, highly detailed, 35mm"
    return {
        checkpoint: _node("CheckpointLoaderSimple", {"ckpt_name": "sd_xl_base_1.0.safetensors"}),
        positive: _node("CLIPTextEncode", {"text": text, "clip": [checkpoint, 1]}),
        negative: _node("CLIPTextEncode", {"text": "blurry, lowres", "clip": [checkpoint, 1]}),
        sampler: _node(
            "KSampler",
            {
                "seed": 156680208700286 + first,
                "steps": 20,
                "cfg": 8.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
                "model": [checkpoint, 0],
                "positive": [positive, 0],
                "negative": [negative, 0],
                "latent_image": ["5", 0],
            },
        ),
    }


def _node(class_type: str, inputs: dict[str, Any]) -> dict[str, Any]:
    return {"inputs": inputs, "class_type": class_type, "_meta": {"title": class_type}}


BODIES = {"docs": docs_body, "large": large_body}


def body(name: str) -> Body:
    return BODIES[name]()


def v2_job(prompt_body: bytes, comfy_key: str) -> bytes:
    """A `POST /prompt` body as the Comfy API v2's `POST /api/v2/jobs` takes it."""
    payload = orjson.loads(prompt_body)
    job = {"workflow": payload["prompt"], "extra_data": {"api_key_comfy_org": comfy_key}}
    return orjson.dumps(job)
