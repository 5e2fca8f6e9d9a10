"""Every spelling of a file name that must never be read, and the core loaders that read
them (shared by tests/proxy and the authorization matrix)."""

from __future__ import annotations

from typing import Any


def refused_names(other_folder: str, name: str = "x.png") -> list[str]:
    """Another user's folder in every spelling, host paths, climbing, odd characters."""
    upper = other_folder[:4].upper() + other_folder[4:].upper()
    return [
        f"{other_folder}/{name}",
        f"{other_folder}/{name} [input]",
        f"{other_folder}/{name} [output]",
        f"{other_folder}/{name}[temp]",
        f"{other_folder}/{name} [temp]",
        f"sub/{other_folder}/{name}",
        f"{upper}/{name}",
        f"{name}[output]",
        f"/opt/ComfyUI/output/{name}",
        f"/opt/ComfyUI/input/{other_folder}/{name}",
        "/etc/passwd [output]",
        f"C:\\ComfyUI\\output\\{name}",
        f"C:/ComfyUI/output/{name} [output]",
        f"\\\\server\\share\\{name}",
        f"//server/share/{name}",
        f"~/{name}",
        f"../output/{name}",
        f"../input/{other_folder}/{name}",
        f"sub/../../{name} [input]",
        "..",
        f"x\\{name}",
        f"{name}\x00.jpg",
        f"./{name}",
        f"a//{name}",
    ]


def loader_graphs(name: str) -> dict[str, dict[str, Any]]:
    """One graph per core loader, each naming `name` where that loader reads a file."""
    preview = {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}
    view3d = {
        "image": "ok.png [temp]", "mask": "m.png [temp]", "normal": "n.png [temp]",
        "camera_info": {"position": {"x": 1}}, "recording": "",
    }  # fmt: skip
    loaders: dict[str, dict[str, Any]] = {
        "LoadImage": {"image": name},
        "LoadImageMask": {"image": name, "channel": "alpha"},
        "LoadImageOutput": {"image": name},
        "LoadAudio": {"audio": name},
        "LoadVideo": {"file": name},
        "Load3D model_file": {"model_file": name, "image": view3d, "width": 8, "height": 8},
        "Load3D image": {"model_file": "3d/a.glb", "image": {**view3d, "mask": name}},
        "Load3D recording": {"model_file": "3d/a.glb", "image": {**view3d, "recording": name}},
    }
    return {
        label: {"1": {"class_type": label.split()[0], "inputs": inputs}, "2": preview}
        for label, inputs in loaders.items()
    }
