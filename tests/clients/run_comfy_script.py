"""comfy-script: its runtime loads the node catalog, builds a workflow in Python and waits
for it over the websocket (credentials as a bearer header on every request)."""

from __future__ import annotations

import json
import os
import sys

import aiohttp
from comfy_script import client  # type: ignore[import-untyped]
from comfy_script.runtime import Workflow, load  # type: ignore[import-untyped]


def session() -> aiohttp.ClientSession:
    token = os.environ["BROKER_TOKEN"]
    return aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"})


def main() -> None:
    load(client.Client(os.environ["BROKER_URL"], session_factory=session))
    from comfy_script.runtime.nodes import LoadImage, SaveImage  # type: ignore[import-untyped]

    with Workflow(wait=True) as workflow:
        image, _ = LoadImage("example.png")
        SaveImage(image, "comfyscript")
    sys.stdout.write(json.dumps({"prompt_id": workflow.task.prompt_id}) + "\n")
    sys.stdout.flush()
    os._exit(0)  # its websocket watcher thread never ends


if __name__ == "__main__":
    main()
