"""comfy-api-simplified: catalogs, a workflow, its images (credentials as HTTP Basic)."""

from __future__ import annotations

import json
import os
import sys

from comfy_api_simplified import ComfyApiWrapper, ComfyWorkflowWrapper  # type: ignore[import-untyped]


def main() -> None:
    api = ComfyApiWrapper(
        os.environ["BROKER_URL"], user="token", password=os.environ["BROKER_TOKEN"]
    )
    workflow = ComfyWorkflowWrapper(json.loads(sys.stdin.read()))
    embeddings = api.get_embeddings()
    stats = api.get_system_stats()
    images = api.queue_and_wait_images(workflow, "Save Image")
    sys.stdout.write(json.dumps({
        "embeddings": embeddings,
        "comfyui_version": stats["system"]["comfyui_version"],
        "images": {name: len(data) for name, data in images.items()},
    }) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
