"""comfyui-workflow-client: a workflow file run by polling /history (credentials in the URL)."""

from __future__ import annotations

import json
import os
import sys
import tempfile

from comfyuiclient import ComfyUIClient  # type: ignore[import-untyped]


def main() -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        f.write(sys.stdin.read())
    host = os.environ["BROKER_URL"].removeprefix("http://")
    client = ComfyUIClient(f"token:{os.environ['BROKER_TOKEN']}@{host}", f.name)
    client.connect()
    client.set_data(key="Save Image", input_key="filename_prefix", input_value="wfclient")
    results = client.generate(["Save Image"])
    client.close()
    image = results["Save Image"]
    sys.stdout.write(json.dumps({"image": [image.width, image.height]}) + "\n")


if __name__ == "__main__":
    main()
