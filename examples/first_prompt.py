"""Run the sample workflow through the broker and save its images (standard library only).

    BROKER=http://127.0.0.1:8189 USER_TOKEN=cbk_usr_… python3 examples/first_prompt.py

The workflow carries no key: the broker injects the user's own Comfy key.
"""

from __future__ import annotations

import json
import os
import time
import urllib.parse
import urllib.request
from pathlib import Path

BROKER = os.environ.get("BROKER", "http://127.0.0.1:8189")
TOKEN = os.environ["USER_TOKEN"]
WORKFLOW = Path(__file__).with_name("flux_ultra.json")


def call(path: str, body: object | None = None) -> bytes:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{BROKER}{path}", data=data)
    request.add_header("Authorization", f"Bearer {TOKEN}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=60) as response:
        return bytes(response.read())


def main() -> None:
    prompt = json.loads(WORKFLOW.read_text())
    queued = json.loads(call("/prompt", {"prompt": prompt}))
    prompt_id = queued["prompt_id"]
    print("queued", prompt_id)
    while True:  # or listen on /ws?clientId=…&token=… for live events
        history = json.loads(call(f"/history/{prompt_id}"))
        if prompt_id in history and history[prompt_id]["status"].get("completed") is not None:
            break
        time.sleep(1)
    entry = history[prompt_id]
    print("status", entry["status"]["status_str"])
    for output in entry["outputs"].values():
        for image in output.get("images", []):
            query = urllib.parse.urlencode(image)
            saved = Path(Path(image["filename"]).name)  # here, whatever the name says
            saved.write_bytes(call(f"/view?{query}"))
            print("saved", saved)


if __name__ == "__main__":
    main()
